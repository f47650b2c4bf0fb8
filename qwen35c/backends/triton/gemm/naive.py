"""fp32 torch twins of the GEMM kernels (same signatures), plus the offline quantizers used by tests.

Layouts are documented in `qwen35c.backends.triton.gemm` (the package docstring).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0          # float8_e4m3fn largest finite value
FP8_BLOCK = 128          # weight block (128 x 128) and activation group (1 x 128)
_SCALE_FLOOR = 1e-10     # amax floor so that an all-zero group gets a finite scale


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight.T in fp32, cast to x.dtype. x [M, K], weight [N, K] -> [M, N]."""
    return (x.float() @ weight.float().t()).to(x.dtype)


def fp8_quantize_activations(x: torch.Tensor, group_size: int = FP8_BLOCK):
    """Dynamic per-token, per-group quantization: s = amax/448, q = clamp(x/s) as E4M3.

    x [M, K] -> (q [M, K] float8_e4m3fn, s [M, ceil(K/group)] fp32). Multiply to dequantize.
    """
    m, k = x.shape
    groups = -(-k // group_size)
    xp = torch.zeros(m, groups * group_size, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.float()
    xg = xp.view(m, groups, group_size)
    scale = xg.abs().amax(dim=-1).clamp_min(_SCALE_FLOOR) / FP8_MAX
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(m, groups * group_size)[:, :k].contiguous(), scale


def fp8_dequantize_activations(q: torch.Tensor, scale: torch.Tensor, group_size: int = FP8_BLOCK):
    """Inverse of `fp8_quantize_activations` in fp32: x = q * s (per token, per group)."""
    k = q.shape[1]
    s = scale.repeat_interleave(group_size, dim=1)[:, :k]
    return q.float() * s


def fp8_quantize_weight_blocks(weight: torch.Tensor, block: int = FP8_BLOCK):
    """Offline 128x128 block quantization (the Qwen/DeepSeek layout).

    weight [N, K] -> (w [N, K] float8_e4m3fn, weight_scale_inv [ceil(N/128), ceil(K/128)] fp32),
    weight_scale_inv = amax/448 of each tile (multiplied to dequantize).
    """
    n, k = weight.shape
    nb, kb = -(-n // block), -(-k // block)
    wp = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=weight.device)
    wp[:n, :k] = weight.float()
    tiles = wp.view(nb, block, kb, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(_SCALE_FLOOR) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale


def fp8_dequantize_weight_blocks(w: torch.Tensor, weight_scale_inv: torch.Tensor, block: int = FP8_BLOCK):
    """W = w_fp8 * weight_scale_inv, broadcast over each 128x128 tile, in fp32."""
    n, k = w.shape
    s = weight_scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return w.float() * s


def fp8_block_linear(x_q, x_scale, weight, weight_scale_inv, out_dtype=torch.bfloat16):
    """y = dequant(x_q, x_scale) @ dequant(weight, weight_scale_inv).T in fp32, cast to out_dtype."""
    a = fp8_dequantize_activations(x_q, x_scale)
    b = fp8_dequantize_weight_blocks(weight, weight_scale_inv)
    return (a @ b.t()).to(out_dtype)


def fp8_linear(x, weight, weight_scale_inv):
    """Quantize x dynamically (1x128 groups), then `fp8_block_linear`; output in x.dtype."""
    x_q, x_scale = fp8_quantize_activations(x)
    return fp8_block_linear(x_q, x_scale, weight, weight_scale_inv, out_dtype=x.dtype)


def int4_pack(weight: torch.Tensor, group_size: int = 128, zero_point: bool = False):
    """Offline round-to-nearest INT4 quantization into the kernel's layout.

    weight [N, K] -> (qweight uint8 [N, K/2], scales [N, K/group] in weight.dtype, zeros uint8
    [N, K/group] or None). Symmetric: q = clamp(round(w/s), -8, 7) + 8 with s = amax/7.
    Asymmetric: s = (max-min)/15, z = round(-min/s), q = clamp(round(w/s) + z, 0, 15).
    """
    n, k = weight.shape
    assert k % group_size == 0 and group_size % 2 == 0
    wg = weight.float().view(n, k // group_size, group_size)
    if zero_point:
        lo = wg.amin(-1).clamp_max(0.0)
        hi = wg.amax(-1).clamp_min(0.0)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8)
        zeros = (-lo / scale).round().clamp(0, 15)
        q = (wg / scale[..., None]).round() + zeros[..., None]
        q = q.clamp(0, 15)
        zeros_u8 = zeros.to(torch.uint8)
    else:
        scale = (wg.abs().amax(-1) / 7.0).clamp_min(1e-8)
        q = ((wg / scale[..., None]).round().clamp(-8, 7) + 8)
        zeros_u8 = None
    scale = scale.to(weight.dtype)
    q = q.to(torch.uint8).view(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return packed, scale.contiguous(), zeros_u8


def int4_dequantize(qweight, scales, zeros=None, group_size: int = 128):
    """W [N, K] fp32 = (q - z) * s, with z = 8 when `zeros` is None."""
    n = qweight.shape[0]
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).view(n, -1).float()
    z = zeros.float() if zeros is not None else torch.full_like(scales, 8, dtype=torch.float32)
    z = z.repeat_interleave(group_size, dim=1)
    s = scales.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def int4_linear(x, qweight, scales, zeros=None, group_size: int = 128):
    """y = x @ int4_dequantize(...).T in fp32, cast to x.dtype. x [M, K] -> [M, N]."""
    w = int4_dequantize(qweight, scales, zeros, group_size)
    return (x.float() @ w.t()).to(x.dtype)
