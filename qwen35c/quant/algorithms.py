"""How quantized codes are chosen: RTN (data-free), AWQ and GPTQ (calibrated), for one matrix.

Every function takes the full-precision weight [N, K] (nn.Linear layout, y = x W^T) and, for the
calibrated ones, the layer's calibration inputs X [n, K], and returns a packed `Fp8Weight` /
`Int4Weight` (formats.py) — so the result is always read back through the same dequantize twin.

AWQ (Lin et al. 2023). Per input channel k, s_k = mean|x_k|^alpha (normalised so that
sqrt(max s * min s) = 1), alpha searched on a grid in [0, 1] to minimise ||X W^T - X Wq(alpha)^T||^2,
where Wq(alpha) = deq(Q(W diag(s))) diag(1/s). Then, optionally, a per-(row, group) clipping ratio
in [0.5, 1] is searched on the same objective. The scales are KEPT EXPLICIT: the packed matrix is
Q(W diag(s)) and `Int4Weight.pre_scale = 1/s` multiplies the activations before the packed GEMM
(one elementwise Mul in the ONNX graph). They are not folded into the previous norm / projection,
which keeps every quantized linear self-contained (a shared norm would otherwise need every
consumer, including the high-precision router, rescaled).

GPTQ (Frantar et al. 2022). H = 2/n X^T X (+ damp * mean(diag H) on the diagonal; dead columns get
H_kk = 1 and W_:k = 0), upper Cholesky factor of H^-1, columns quantized left to right in blocks of
`gptq_block` with the error of each column propagated onto the remaining ones (lazy batch updates).
Group scale / zero point are computed when a group starts, from the error-updated weights. With
`act_order` columns are visited by decreasing diag(H); with `static_groups` (default) the group
parameters are computed beforehand from the original weights in the original column order, so the
packed layout needs no `g_idx`; without it groups follow the permuted order and `g_idx` is stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qwen35c.quant.formats import (
    Fp8Weight, Int4Weight, fp8_quantize, int4_codes, int4_group_params, int4_pack_codes, int4_quantize,
)
from qwen35c.quant.recipe import Recipe

__all__ = ["rtn", "awq", "gptq", "quantize_weight", "AWQ_CLIP_RATIOS"]

AWQ_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))   # 1.0 .. 0.5
_AWQ_ROWS = 512          # calibration rows used by the AWQ searches (a seeded uniform subsample)


def rtn(weight: Tensor, recipe: Recipe, input_amax: Tensor | None = None, bits: int = 4) -> Fp8Weight | Int4Weight:
    """Round to nearest: FP8 at the recipe's granularity, or INT4 min/max (asym) / the recipe's scale
    rule (sym); `bits` = 8 for an 8-bit unit (`Recipe.unit_bits`)."""
    if recipe.is_fp8:
        input_scale = None
        if recipe.activations == "static":
            if input_amax is None:
                raise ValueError("static FP8 activations need the calibrated input amax")
            input_scale = (input_amax.float().clamp_min(1e-10) / 448.0).reshape(())
        return fp8_quantize(weight, recipe.fp8_granularity, recipe.activations, input_scale)
    return int4_quantize(weight, recipe.group_size, recipe.symmetric, rule=_rule(recipe, bits), bits=bits)


def _rule(recipe: Recipe, bits: int) -> str:
    """The scale rule of a `bits`-wide unit: the recipe's for INT4; 8-bit codes use amax / 127."""
    return recipe.scales if bits == 4 else "amax"


def _subsample(x: Tensor, rows: int, seed: int = 0) -> Tensor:
    if x.shape[0] <= rows:
        return x.float()
    index = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
    return x[index].float()


def _int4_deq(weight: Tensor, recipe: Recipe, clip: Tensor | float = 1.0, bits: int = 4) -> Tensor:
    return int4_quantize(weight, recipe.group_size, recipe.symmetric, clip, bits=bits).dequantize()


def awq(weight: Tensor, inputs: Tensor, recipe: Recipe, bits: int = 4) -> Int4Weight:
    """Activation-aware scale search (+ clipping search); returns INT4 with an explicit `pre_scale`."""
    w = weight.float()
    x = _subsample(inputs, _AWQ_ROWS)
    n, k = w.shape
    ref = x @ w.t()                                                                   # [T, N]
    x_mean = inputs.float().abs().mean(0).clamp_min(1e-6)                             # [K]
    best = (math.inf, torch.ones(k))
    for step in range(recipe.awq_grid + 1):
        alpha = step / recipe.awq_grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        w_eff = _int4_deq(w * s, recipe, bits=bits) / s
        err = float((x @ w_eff.t() - ref).pow(2).mean())
        if err < best[0]:
            best = (err, s)
    s = best[1]
    scaled = w * s                                                                    # the matrix packed
    clip: Tensor | float = 1.0
    if recipe.awq_clip:
        clip = _awq_clip(scaled, x / s, recipe, bits)
    packed = int4_quantize(scaled, recipe.group_size, recipe.symmetric, clip, bits=bits)
    packed.pre_scale = (1.0 / s).float().contiguous()
    return packed


def _awq_clip(w: Tensor, x: Tensor, recipe: Recipe, bits: int = 4) -> Tensor:
    """Per (row, group) ratio in AWQ_CLIP_RATIOS minimising sum_t (x_g[t] . (w_g - wq_g))^2."""
    n, k = w.shape
    g = recipe.group_size
    groups = k // g
    wg = w.view(n, groups, g)
    xg = x.view(-1, groups, g)                                                        # [T, G, g]
    best_err = torch.full((n, groups), math.inf)
    best_ratio = torch.ones(n, groups)
    for ratio in AWQ_CLIP_RATIOS:
        scale, zero = int4_group_params(wg, recipe.symmetric, ratio, bits=bits)
        deq = (int4_codes(wg, scale, zero, bits) - zero[..., None]) * scale[..., None]
        diff = wg - deq                                                               # [N, G, g]
        err = torch.einsum("tgk,ngk->tng", xg, diff).pow(2).sum(0)                   # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def gptq(weight: Tensor, inputs: Tensor | None, recipe: Recipe, hessian: Tensor | None = None,
         bits: int = 4) -> Int4Weight:
    """Hessian-based INT4 with block-wise error compensation (see the module docstring).

    Rows of W are independent given H (the compensation runs along K within a row), so they are
    processed in chunks of about `_GPTQ_CHUNK_BYTES` of fp32: a 248K x 2048 LM head needs a few
    chunk-sized temporaries, not five copies of itself. The result does not depend on the chunking."""
    n, k = weight.shape
    g = recipe.group_size
    if k % g:
        raise ValueError(f"GPTQ: group {g} does not divide K={k}")
    h = hessian.float().clone() if hessian is not None else _hessian(inputs)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    if recipe.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k)
    h_inv = _upper_cholesky_of_inverse(h, recipe.damp)
    del h
    rows = max(1, _GPTQ_CHUNK_BYTES // (4 * k))
    parts = [_gptq_rows(weight[r:r + rows], dead, perm, h_inv, recipe, bits) for r in range(0, n, rows)]
    g_idx = parts[0][3]
    codes = torch.cat([p[0] for p in parts])
    scales = torch.cat([p[1] for p in parts])
    trivial = bool((g_idx == torch.arange(k) // g).all())
    return Int4Weight(codes, scales.contiguous(),
                      None if recipe.symmetric else torch.cat([p[2] for p in parts]).to(torch.uint8).contiguous(), g,
                      None if trivial else g_idx.to(torch.int32), bits=bits)


_GPTQ_CHUNK_BYTES = 256 << 20


def _gptq_rows(weight: Tensor, dead: Tensor, perm: Tensor, h_inv: Tensor, recipe: Recipe, bits: int = 4):
    """GPTQ of the rows `weight` [n, K] (H's dead columns, column order and chol(H^-1) given):
    (packed codes [n, K/2], scales [n, K/g], zeros [n, K/g], g_idx [K])."""
    w = weight.float().clone()
    n, k = w.shape
    g = recipe.group_size
    w[:, dead] = 0.0
    inv_perm = torch.argsort(perm)
    static = recipe.act_order and recipe.static_groups
    rule, top = _rule(recipe, bits), (1 << bits) - 1
    if static or not recipe.act_order:
        group_of_col = torch.arange(k) // g            # original column -> group
    scales = torch.zeros(n, k // g)
    zeros = torch.zeros(n, k // g)
    if static:
        s0, z0 = int4_group_params(w.view(n, k // g, g), recipe.symmetric, rule=rule, bits=bits)
        scales.copy_(s0)
        zeros.copy_(z0)
    w = w[:, perm]

    codes = torch.zeros(n, k)
    g_idx = torch.empty(k, dtype=torch.long)
    block = recipe.gptq_block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i                                   # position in visiting order
            col = int(perm[j])
            if static or not recipe.act_order:
                group = int(group_of_col[col])
                if not static and j % g == 0:           # plain GPTQ: group starts here, in order
                    cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g]
                    s, z = int4_group_params(cols, recipe.symmetric, rule=rule, bits=bits)
                    scales[:, group], zeros[:, group] = s, z
            else:                                        # act-order, dynamic groups: permuted order
                group = j // g
                if j % g == 0:
                    cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g]
                    s, z = int4_group_params(cols, recipe.symmetric, rule=rule, bits=bits)
                    scales[:, group], zeros[:, group] = s, z
            g_idx[col] = group
            s, z = scales[:, group], zeros[:, group]
            q = ((w1[:, i] / s).round() + z).clamp(0, top)
            codes[:, j] = q
            deq = (q - z) * s
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return int4_pack_codes(codes[:, inv_perm], bits), scales, zeros, g_idx


def _hessian(x: Tensor) -> Tensor:
    x = x.float()
    return 2.0 / max(x.shape[0], 1) * (x.t() @ x)


def _upper_cholesky_of_inverse(h: Tensor, damp: float) -> Tensor:
    """chol(H^-1) (upper) with `damp` * mean(diag H) added, raising the damping until it factors.

    In float64 on one column-major copy of H, which LAPACK factorises in place (a row-major one is
    copied to column-major by every call): at K = 9216, a 4B model's down_proj, one 680 MB matrix is
    held instead of four plus an identity. The damped diagonal is formed in float32 before widening,
    so the result is the out-of-place formula's to the bit."""
    n = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    status = torch.empty((), dtype=torch.int32)
    a = torch.empty_strided((n, n), (1, n), dtype=torch.float64)
    for attempt in range(6):
        a.copy_(h)
        a.diagonal().copy_(torch.diag(h) + (damp * (10 ** attempt)) * mean_diag * torch.ones(1))
        torch.linalg.cholesky_ex(a, out=(a, status))
        if int(status) == 0:
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, status))
            if int(status) == 0:
                return a.to(torch.float32, memory_format=torch.contiguous_format)
    raise ValueError("GPTQ: the Hessian is not positive definite even with heavy damping")


def quantize_weight(weight: Tensor, recipe: Recipe, inputs: Tensor | None = None,
                    input_amax: Tensor | None = None, bits: int = 4) -> Fp8Weight | Int4Weight:
    """Dispatch on the recipe. Calibrated algorithms fall back to RTN when `inputs` is empty
    (an expert no calibration token reached with moe_calibration='routed')."""
    if recipe.is_fp8 or recipe.algorithm == "rtn":
        return rtn(weight, recipe, input_amax, bits)
    if inputs is None or inputs.shape[0] == 0:
        return rtn(weight, recipe, bits=bits)
    if recipe.algorithm == "awq":
        return awq(weight, inputs, recipe, bits)
    return gptq(weight, inputs, recipe, bits=bits)
