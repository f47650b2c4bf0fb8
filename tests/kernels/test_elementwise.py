"""SwiGLU and KV-cache write kernels vs their twins; the FP8 activation quantizer's E4M3 emulation
(the CPU interpreter's path) vs torch's float8_e4m3fn cast; GEMMs with bf16 weights under fp32
activations (the interpreter's mixed case)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch

from qwen35c.backends.triton.elementwise import kv_cache_write, naive, swiglu
from qwen35c.backends.triton.gemm import fp8_quantize_activations, linear


def test_swiglu_strided():
    g = torch.Generator().manual_seed(0)
    both = torch.randn(37, 2 * 200, generator=g)
    gate, up = both[:, :200], both[:, 200:]
    assert (swiglu(gate, up) - naive.swiglu(gate, up)).abs().max() <= 1e-6


def test_kv_cache_write_rows_and_padding():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(3, 5, 2, 16, generator=g)
    q_start, lengths = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([5, 2, 0], dtype=torch.int32)
    cache = torch.full((3, 2, 16, 16), 7.0)
    want = cache.clone()
    kv_cache_write(src, cache, q_start, lengths)
    naive.kv_cache_write(src, want, q_start, lengths)
    assert torch.equal(cache, want)   # padding (t >= lengths[b]) never written


def test_fp8_activation_emulation_matches_e4m3_cast():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 300, generator=g) * torch.logspace(-4, 3, 300)
    x[0, :5] = torch.tensor([0.0, 1e-30, -448.0, 3.0, 2 ** -9 * 1.5])
    q, s = fp8_quantize_activations(x, emulate=True)
    assert q.dtype == torch.float32
    groups = torch.nn.functional.pad(x, (0, 84)).view(9, 3, 128)
    scale = groups.abs().amax(-1).clamp_min(1e-10) / 448.0
    want = (groups / scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).float().view(9, 384)[:, :300]
    assert torch.equal(s, scale) and torch.equal(q, want)


def test_gemm_fp32_activations_bf16_weights():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 256, generator=g), torch.randn(64, 256, generator=g).bfloat16()
    assert (linear(x, w) - x @ w.float().T).abs().max() <= 1e-4
