"""Packed weight formats: FP8 E4M3 (block 128x128, per tensor, per channel) and INT4 group-wise.

Each format is a small dataclass holding the packed tensors plus the metadata needed to read them;
`dequantize()` is the fp32 reference twin of the packed GEMM (STYLE lesson 3), and every format has
an activation fake-quant (`fake_quant_activations`) used by the quantization-emulating reference.

Layouts (aligned with `qwen35c.backends.triton.gemm`, whose docstring is the kernel contract):

FP8 (`Fp8Weight`), always float8_e4m3fn codes [N, K] and fp32 scales that are MULTIPLIED:
  granularity "block":   scale [ceil(N/128), ceil(K/128)] = amax/448 of each 128x128 tile (the
                         official Qwen `weight_scale_inv`; the Triton FP8 GEMM's layout).
  granularity "tensor":  scale [] (0-d) = amax/448 of the whole matrix.
  granularity "channel": scale [N] = amax/448 of each output row.
  Activations: "dynamic" (per token, per 128-channel group for "block", per token for the others:
  s = max(amax, 1e-10)/448 computed at run time), or "static" (one calibrated fp32 `input_scale`,
  x_q = clamp(x / input_scale, +-448)), or "none" (weight-only FP8).

INT4 (`Int4Weight`), the Triton INT4 GEMM / ONNX Runtime MatMulNBits layout flattened per row:
  qweight uint8 [N, K/2]: byte (n, j) holds k = 2j in its low nibble, k = 2j+1 in its high nibble.
  scales  fp32 [N, K/g];  zeros uint8 [N, K/g] codes 0..15, or None = symmetric (zero point 8).
          A symmetric scale may be negative (`scales="mse"`): the code range -8..7 is asymmetric, so a
          group whose extreme is positive maps it to -8 with s < 0 (llama.cpp's Q4_0 trick).
  bits    8 (the `head_bits=8` LM head and the embedding that shares its table): the same group-wise
          format one code a byte, qweight uint8 [N, K], zero point 128 (MatMulNBits / GatherBlockQuantized
          with bits=8). Symmetric only.
  g_idx   optional int32 [K]: the group of input column k (GPTQ act-order without static groups);
          None = k // g. W[n, k] = (code[n, k] - zero[n, g_idx[k]]) * scale[n, g_idx[k]].
  pre_scale optional fp32 [K]: AWQ's per-input-channel scale kept EXPLICIT: the layer computes
          (x * pre_scale) @ W_q^T, i.e. the packed matrix encodes W / pre_scale. Not folded into the
          previous op (see `qwen35c.quant.algorithms.awq`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "FP8_MAX", "FP8_BLOCK", "SCALE_FLOOR", "Fp8Weight", "Int4Weight", "QuantizedWeight",
    "fp8_quantize", "fp8_dequantize", "fp8_fake_quant_activations", "fp8_quantize_activations",
    "int4_quantize", "int4_group_params", "int4_codes", "int4_pack_codes", "int4_unpack_codes",
    "int4_dequantize", "int4_rows", "fake_quant_activations", "int4_fake_quant_activations", "gemm_input", "row_slice",
    "last_bit_noise",
]

FP8_MAX = 448.0          # float8_e4m3fn largest finite value (NVIDIA E4M3FN, not AMD's FNUZ 240)
FP8_BLOCK = 128          # weight tile edge and activation group width of the official recipe
SCALE_FLOOR = 1e-10      # amax floor: an all-zero tile or group still gets a finite scale


# ---- FP8 ------------------------------------------------------------------------------------------
@dataclass
class Fp8Weight:
    """An FP8 E4M3 matrix: `weight` codes [N, K] and multiplied fp32 `scale` (shape by granularity)."""

    weight: Tensor                       # float8_e4m3fn [N, K]
    scale: Tensor                        # fp32: block [N/128, K/128] | tensor [] | channel [N]
    granularity: str = "block"           # "block" | "tensor" | "channel"
    activations: str = "dynamic"         # "dynamic" | "static" | "none"
    input_scale: Tensor | None = None    # fp32 [] when activations == "static"
    block: int = FP8_BLOCK
    kind: str = field(default="fp8", init=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> Tensor:
        return fp8_dequantize(self.weight, self.scale, self.granularity, self.block)

    def effective_weight(self) -> Tensor:
        return self.dequantize()

    def fake_quant_input(self, x: Tensor) -> Tensor:
        return fake_quant_activations(x, self)

    def tensors(self) -> dict[str, Tensor]:
        out = {"weight": self.weight, "scale": self.scale}
        if self.input_scale is not None:
            out["input_scale"] = self.input_scale
        return out


def _tile(weight: Tensor, block: int) -> tuple[Tensor, int, int]:
    n, k = weight.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = weight.new_zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = weight.float()
    return padded.view(nb, block, kb, block), nb, kb


def fp8_quantize(weight: Tensor, granularity: str = "block", activations: str = "dynamic",
                 input_scale: Tensor | None = None, block: int = FP8_BLOCK) -> Fp8Weight:
    """Round-to-nearest-even E4M3 with amax/448 scales at the given granularity (data-free)."""
    n, k = weight.shape
    w = weight.float()
    if granularity == "block":
        tiles, nb, kb = _tile(w, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp_min(SCALE_FLOOR) / FP8_MAX      # [nb, kb]
        codes = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        codes = codes.view(nb * block, kb * block)[:n, :k].contiguous()
    elif granularity == "tensor":
        scale = w.abs().amax().clamp_min(SCALE_FLOOR) / FP8_MAX                     # []
        codes = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    elif granularity == "channel":
        scale = w.abs().amax(dim=1).clamp_min(SCALE_FLOOR) / FP8_MAX                # [N]
        codes = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        raise ValueError(f"unknown FP8 granularity '{granularity}' (block, tensor or channel)")
    if activations == "static" and input_scale is None:
        raise ValueError("static FP8 activations need a calibrated input_scale")
    if activations not in ("dynamic", "static", "none"):
        raise ValueError(f"unknown FP8 activation scheme '{activations}' (dynamic, static or none)")
    return Fp8Weight(codes, scale.float(), granularity, activations,
                     None if input_scale is None else input_scale.float().reshape(()), block)


def fp8_dequantize(codes: Tensor, scale: Tensor, granularity: str = "block", block: int = FP8_BLOCK) -> Tensor:
    """The reference twin of every FP8 GEMM: W = codes * scale broadcast per tile / tensor / row (fp32)."""
    n, k = codes.shape
    if granularity == "block":
        s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    elif granularity == "tensor":
        s = scale.float().reshape(())
    elif granularity == "channel":
        s = scale.float().reshape(n, 1)
    else:
        raise ValueError(f"unknown FP8 granularity '{granularity}'")
    return codes.float() * s


def fp8_quantize_activations(x: Tensor, group: int | None = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """Dynamic per-token quantization of x [..., K]: groups of `group` channels (None = whole row).

    Returns (codes float8_e4m3fn [..., K], scale fp32 [..., ceil(K/group)] or [..., 1])."""
    k = x.shape[-1]
    width = k if group is None else group
    groups = -(-k // width)
    xf = x.float()
    if groups * width != k:
        xf = torch.nn.functional.pad(xf, (0, groups * width - k))
    xg = xf.reshape(*x.shape[:-1], groups, width)
    scale = xg.abs().amax(dim=-1).clamp_min(SCALE_FLOOR) / FP8_MAX
    codes = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.reshape(*x.shape[:-1], groups * width)[..., :k], scale


def fp8_fake_quant_activations(x: Tensor, group: int | None = FP8_BLOCK,
                               input_scale: Tensor | None = None) -> Tensor:
    """Quantize-dequantize x as the FP8 GEMM sees it; same dtype as x. Static when `input_scale`."""
    if input_scale is not None:
        s = input_scale.float()
        return ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).to(x.dtype)
    codes, scale = fp8_quantize_activations(x, group)
    k = x.shape[-1]
    width = k if group is None else group
    s = scale.repeat_interleave(width, dim=-1)[..., :k]
    return (codes.float() * s).to(x.dtype)


# ---- INT4 -----------------------------------------------------------------------------------------
@dataclass
class Int4Weight:
    """A group-wise INT4 matrix in the Triton / MatMulNBits layout (see the module docstring)."""

    qweight: Tensor                      # uint8 [N, K/2], low nibble = even k
    scales: Tensor                       # fp32 [N, K/g]
    zeros: Tensor | None                 # uint8 [N, K/g] (asymmetric) or None (symmetric, zero 8)
    group_size: int = 128
    g_idx: Tensor | None = None          # int32 [K] or None (= k // g)
    pre_scale: Tensor | None = None      # fp32 [K] multiplied into x before the GEMM (AWQ, explicit)
    act_int8: bool = False               # the GEMM quantizes x to int8 per token per K group (int4_fake_quant_activations)
    bits: int = 4                        # 8: one code a byte, zero point 128 (symmetric only)
    kind: str = field(default="int4", init=False)

    def __post_init__(self):
        if self.bits not in (4, 8) or (self.bits == 8 and self.zeros is not None):
            raise ValueError(f"group-wise integer weights are 4-bit or symmetric 8-bit, not {self.bits}-bit"
                             f"{' with zero points' if self.zeros is not None else ''}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.qweight.shape[1] * 8 // self.bits)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def codes(self) -> Tensor:
        return int4_unpack_codes(self.qweight) if self.bits == 4 else self.qweight

    def dequantize(self) -> Tensor:
        """W_q [N, K] fp32 (what the packed GEMM multiplies; does not include `pre_scale`)."""
        return int4_dequantize(self.qweight, self.scales, self.zeros, self.group_size, self.g_idx, self.bits)

    def effective_weight(self) -> Tensor:
        """The matrix the layer applies to x: W_q * pre_scale (column-wise) when AWQ kept a scale."""
        w = self.dequantize()
        return w if self.pre_scale is None else w * self.pre_scale.float()[None, :]

    def fake_quant_input(self, x: Tensor) -> Tensor:
        return x  # weight-only (W4A16): activations stay in the model dtype

    def tensors(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        for key in ("zeros", "g_idx", "pre_scale"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


QuantizedWeight = Fp8Weight | Int4Weight


def int4_group_params(w: Tensor, symmetric: bool, clip: Tensor | float = 1.0, rule: str = "amax",
                      bits: int = 4) -> tuple[Tensor, Tensor]:
    """Scale and zero point of groups w [..., g] (fp32), codes 0..2^bits-1. Symmetric, zero point
    2^(bits-1) (m = 2^(bits-1) - 1: 7 or 127):
      rule "amax": s = amax / m (codes -m..m; INT4's code 0 unused);
      rule "mse":  the signed scale minimising sum (w - s q)^2 over candidates s = w_x / t, w_x the
                   group's value of largest magnitude, t in -8.6 .. -6.6 (step 0.2; INT4 only), each
                   refitted by least squares on its codes (s = <w, q> / <q, q>); t = -8 maps w_x to
                   the code range's extra level -8 (Q4_0's scale) and t = -7 is amax / 7 up to the
                   sign, so "mse" is never worse than either.
    Asymmetric (INT4): s = (max-min)/15, z = round(-min/s) (the range always includes 0).
    `clip` shrinks the range (AWQ's clipping search, amax rule); it broadcasts against w[..., 0]."""
    w = w.float()
    mid = float(1 << (bits - 1))
    if not symmetric:
        if bits != 4:
            raise ValueError("asymmetric group quantization is 4-bit only")
        lo = (w.amin(-1) * clip).clamp_max(0.0)
        hi = (w.amax(-1) * clip).clamp_min(0.0)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8)
        return scale, (-lo / scale).round().clamp(0, 15)
    if rule == "amax":
        scale = (w.abs().amax(-1) * clip / (mid - 1)).clamp_min(1e-8)
    elif rule == "mse":
        if bits != 4 or not (isinstance(clip, float) and clip == 1.0):
            raise ValueError("the mse scale search is for INT4 without a clipping ratio")
        scale = _mse_scale(w, mid)
    else:
        raise ValueError(f"unknown INT4 scale rule '{rule}' (amax or mse)")
    return scale, torch.full_like(scale, mid)


_MSE_STEPS = tuple(-t / 10 for t in range(66, 87, 2))     # t = -6.6, -6.8, ..., -8.6 (-7 and -8 among them)
_MSE_BLOCK = 1 << 18                                          # groups' elements per step: small temporaries


def _floor_scale(s: Tensor) -> Tensor:
    """|s| >= 1e-8, keeping the sign (an all-zero group gets 1e-8)."""
    return torch.where(s.abs() < 1e-8, torch.full_like(s, 1e-8), s)


def _mse_scale(w: Tensor, mid: float) -> Tensor:
    """Per group of w [..., g]: each candidate's codes q = round(w / (w_x / t)) refitted to the
    least-squares scale <w, q> / <q, q>, whose residual is |w|^2 - <w, q>^2 / <q, q>; the scale of the
    smallest residual wins (rounding at it afterwards can only lower the error further)."""
    g = w.shape[-1]
    flat = w.reshape(-1, g)
    out = torch.empty(flat.shape[0])
    rows = max(1, _MSE_BLOCK // g)
    for r in range(0, flat.shape[0], rows):
        x = flat[r:r + rows]
        extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        norm = (x * x).sum(-1)
        best_s, best_e = _floor_scale(extreme / -mid), torch.full_like(norm, float("inf"))
        for t in _MSE_STEPS:
            q = (x / _floor_scale(extreme / t)[:, None]).round_().clamp_(-mid, mid - 1)
            wq, qq = (x * q).sum(-1), (q * q).sum(-1)
            err = torch.where(qq > 0, norm - wq * wq / qq.clamp_min(1e-30), norm)
            better = err < best_e
            best_e = torch.where(better, err, best_e)
            best_s = torch.where(better & (qq > 0), wq / qq.clamp_min(1e-30), best_s)
        out[r:r + rows] = _floor_scale(best_s)
    return out.view(w.shape[:-1])


def int4_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int = 4) -> Tensor:
    """Codes 0..2^bits-1 of w [..., g] given per-group scale/zero [...] (round half to even, like torch)."""
    return ((w.float() / scale[..., None]).round() + zero[..., None]).clamp(0, (1 << bits) - 1)


def int4_pack_codes(codes: Tensor, bits: int = 4) -> Tensor:
    """codes [N, K] (0..15) -> uint8 [N, K/2], low nibble = even k (8-bit codes: uint8 [N, K] as they are)."""
    q = codes.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def int4_unpack_codes(qweight: Tensor) -> Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K]."""
    n = qweight.shape[0]
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).view(n, -1)


_RTN_CHUNK_BYTES = 64 << 20     # fp32 rows per RTN chunk: a 248K-row tied head is 1 GB, its temporaries 3-4x


def int4_quantize(weight: Tensor, group_size: int = 128, symmetric: bool = True,
                  clip: Tensor | float = 1.0, rule: str = "amax", bits: int = 4) -> Int4Weight:
    """Round-to-nearest group-wise INT4 (RTN; 8-bit with bits=8). weight [N, K], K % group_size == 0."""
    n, k = weight.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"INT4 group {group_size} does not divide K={k} (or is odd)")
    rows = n if isinstance(clip, Tensor) else max(1, _RTN_CHUNK_BYTES // (4 * k))
    packed, scales, zeros = [], [], []
    for start in range(0, n, rows):          # rows are independent: chunks bound the fp32 temporaries
        wg = weight[start:start + rows].float().view(-1, k // group_size, group_size)
        scale, zero = int4_group_params(wg, symmetric, clip, rule, bits)
        packed.append(int4_pack_codes(int4_codes(wg, scale, zero, bits).view(-1, k), bits))
        scales.append(scale)
        zeros.append(None if symmetric else zero.to(torch.uint8))
    return Int4Weight(torch.cat(packed), torch.cat(scales).contiguous(),
                      None if symmetric else torch.cat(zeros).contiguous(), group_size, bits=bits)


def int4_dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor | None = None, group_size: int = 128,
                    g_idx: Tensor | None = None, bits: int = 4) -> Tensor:
    """The reference twin of the INT4 GEMM: W = (code - zero[g]) * scale[g] in fp32, [N, K]."""
    codes = (int4_unpack_codes(qweight) if bits == 4 else qweight).float()
    k = codes.shape[1]
    index = (torch.arange(k, device=qweight.device) // group_size) if g_idx is None else g_idx.long()
    z = zeros.float()[:, index] if zeros is not None else float(1 << (bits - 1))
    return (codes - z) * scales.float()[:, index]


def int4_rows(weight: Int4Weight, ids: Tensor) -> Tensor:
    """Rows `ids` (any shape) of a symmetric group-wise matrix, dequantized: [*ids.shape, K] fp32 (an
    embedding lookup in a shared head table, without dequantizing the table)."""
    flat = ids.reshape(-1)
    rows = Int4Weight(weight.qweight[flat], weight.scales[flat], None, weight.group_size, bits=weight.bits)
    return rows.dequantize().view(*ids.shape, -1)


def int4_fake_quant_activations(x: Tensor, group_size: int) -> Tensor:
    """x [..., K] -> the int8 image ONNX Runtime's MatMulNBits (accuracy_level=4, MLAS CompInt8)
    multiplies: per token, per contiguous K block of `group_size` (the weight's group), symmetric
    s = amax / 127, q = round-half-even(x / s) in [-127, 127], x_q = q * s (s = 0 for an all-zero
    block). Matches ORT 1.32 to fp32 accumulation order (tests/quant/test_quant_lowering.py)."""
    k = x.shape[-1]
    g = x.float().reshape(*x.shape[:-1], k // group_size, group_size)
    s = g.abs().amax(-1, keepdim=True) / 127.0
    q = torch.round(g / torch.where(s > 0, s, torch.ones_like(s))).clamp(-127, 127)
    return (q * s).reshape(x.shape).to(x.dtype)


_NOISE: list[torch.Generator] = []    # the innermost `last_bit_noise` block's generator


@contextlib.contextmanager
def last_bit_noise(generator: torch.Generator) -> Iterator[None]:
    """Within the block every activation quantizer's input element moves to its fp32 neighbour below,
    stays, or moves to the one above (drawn from `generator`): the emulation as it would be with a
    last-bit difference upstream, which another fp32 accumulation order (ONNX Runtime's, a Triton
    kernel's) makes. Where x sits on a rounding boundary the code flips, and the flips propagate; how
    far that moves the logits is the yardstick of the `quantized-activations` gate
    (`qwen35c.verify.noise_floor`)."""
    _NOISE.append(generator)
    try:
        yield
    finally:
        _NOISE.pop()


def _last_bit(x: Tensor) -> Tensor:
    x = x.float()
    u = torch.randint(-1, 2, x.shape, generator=_NOISE[-1])
    return torch.where(u == 0, x, torch.nextafter(x, torch.where(u > 0, torch.inf, -torch.inf)))


def fake_quant_activations(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """The activation rounding the packed GEMM of `weight` applies to its input x [..., K]
    (for INT4 with AWQ's pre_scale, the caller multiplies pre_scale in first: see `int4_gemm_input`)."""
    if _NOISE and (weight.act_int8 if isinstance(weight, Int4Weight) else weight.activations != "none"):
        x = _last_bit(x)
    if isinstance(weight, Int4Weight):
        return int4_fake_quant_activations(x, weight.group_size) if weight.act_int8 else x
    if weight.activations == "none":
        return x
    if weight.activations == "static":
        return fp8_fake_quant_activations(x, input_scale=weight.input_scale)
    return fp8_fake_quant_activations(x, weight.block if weight.granularity == "block" else None)


def gemm_input(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """What the packed GEMM of `weight` multiplies for the layer input x: INT4 applies AWQ's
    pre_scale first, then (int8 activations) the per-group int8 rounding; FP8 fake-quantizes x."""
    pre = getattr(weight, "pre_scale", None)
    if pre is not None:
        x = x * pre.to(x.dtype)
    return fake_quant_activations(x, weight)


def row_slice(weight: QuantizedWeight, begin: int = 0, end: int | None = None) -> QuantizedWeight:
    """Output rows begin:end of a quantized matrix, as the same format (views, no copies). FP8 block
    scales cover `block` rows each: a slice must start on a block edge."""
    import dataclasses

    end = weight.shape[0] if end is None else end
    if (begin, end) == (0, weight.shape[0]):
        return weight
    if isinstance(weight, Int4Weight):
        return dataclasses.replace(weight, qweight=weight.qweight[begin:end], scales=weight.scales[begin:end],
                                   zeros=None if weight.zeros is None else weight.zeros[begin:end])
    if weight.granularity == "block":
        if begin % weight.block:
            raise ValueError(f"an FP8 block-{weight.block} row slice must start on a block edge, not row {begin}")
        scale = weight.scale[begin // weight.block:-(-end // weight.block)]
    else:
        scale = weight.scale[begin:end] if weight.granularity == "channel" else weight.scale
    return dataclasses.replace(weight, weight=weight.weight[begin:end], scale=scale)
