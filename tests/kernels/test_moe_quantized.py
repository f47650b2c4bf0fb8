"""Grouped expert GEMMs over FP8 block-128 / INT4 g128 stacked experts vs the dequantized twin."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import pytest
import torch

from qwen35c.backends.triton.moe import naive
from qwen35c.backends.triton.moe.quantized import moe_experts_quantized
from qwen35c.quant.formats import fp8_fake_quant_activations, fp8_quantize, int4_quantize


def stack(parts):
    return torch.stack(parts).contiguous()


@pytest.mark.parametrize("fmt,h,inter", [("fp8", 64, 32), ("fp8", 192, 160), ("int4", 128, 128)])
def test_quantized_experts(fmt, h, inter):
    g = torch.Generator().manual_seed(h + inter)
    e, n, k = 4, 9, 2
    w13 = torch.randn(e, 2 * inter, h, generator=g) * 0.05
    w2 = torch.randn(e, h, inter, generator=g) * 0.05
    x = torch.randn(n, h, generator=g)
    weights = torch.rand(n, k, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).to(torch.int32)
    if fmt == "fp8":
        gate = [fp8_quantize(w13[i, :inter]) for i in range(e)]
        up = [fp8_quantize(w13[i, inter:]) for i in range(e)]
        down = [fp8_quantize(w2[i]) for i in range(e)]
        q13 = stack([torch.cat([a.weight, b.weight]) for a, b in zip(gate, up)])
        s13 = stack([torch.cat([a.scale, b.scale]) for a, b in zip(gate, up)])
        q2, s2 = stack([d.weight for d in down]), stack([d.scale for d in down])
        eff13 = stack([torch.cat([a.dequantize(), b.dequantize()]) for a, b in zip(gate, up)])
        eff2 = stack([d.dequantize() for d in down])
        fq = fp8_fake_quant_activations
    else:
        gu = [int4_quantize(w13[i]) for i in range(e)]
        down = [int4_quantize(w2[i]) for i in range(e)]
        q13, s13 = stack([a.qweight for a in gu]), stack([a.scales for a in gu])
        q2, s2 = stack([d.qweight for d in down]), stack([d.scales for d in down])
        eff13, eff2 = stack([a.dequantize() for a in gu]), stack([d.dequantize() for d in down])
        fq = None
    got = moe_experts_quantized(x, q13, s13, q2, s2, weights, ids, fmt, emulate_fp8=True)
    want = naive.moe_experts_dequantized(x, eff13, eff2, weights, ids, fq)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
