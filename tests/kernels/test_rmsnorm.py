"""RMSNorm kernels vs their fp32 twins under the Triton CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import pytest
import torch

from qwen35c.backends.triton.rmsnorm import gated_rmsnorm, naive, rmsnorm

# Bounds ~10x the worst measured over the test grid (1 and 2 threads), the measured value beside each.
TOL = {torch.float32: 1e-6, torch.float16: 2e-5}  # measured 8.6e-8 / 2.0e-6


def rel_err(out, ref, floor=1e-6):
    return ((out.float() - ref.float()).pow(2).mean().sqrt() / max(ref.float().pow(2).mean().sqrt().item(), floor)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n", [(1, 64), (63, 96), (65, 256), (3, 1000)])
def test_rmsnorm_zero_centred(rows, n, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, n, generator=g).to(dtype)
    w = (0.1 * torch.randn(n, generator=g)).to(dtype)
    out = rmsnorm(x, w, eps=1e-6)
    ref = naive.rmsnorm(x, w, eps=1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 128), (2, 33, 64), (129, 200)])
def test_rmsnorm_fused_residual(shape, dtype):
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = torch.randn(*shape, generator=g).to(dtype)
    r = torch.randn(*shape, generator=g).to(dtype)
    w = (0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    y, h = rmsnorm(x, w, eps=1e-6, residual=r)
    y_ref, h_ref = naive.rmsnorm(x, w, eps=1e-6, residual=r)
    assert rel_err(h, h_ref) < TOL[dtype] and rel_err(y, y_ref) < TOL[dtype]
    assert torch.equal(h, (x.float() + r.float()).to(dtype))  # the residual is rounded once


def test_rmsnorm_zero_row_is_finite():
    x = torch.zeros(2, 64)
    out = rmsnorm(x, torch.zeros(64))
    assert torch.isfinite(out).all() and out.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,heads,dv", [(1, 4, 128), (65, 2, 64), (63, 3, 48)])
def test_gated_rmsnorm(tokens, heads, dv, dtype):
    g = torch.Generator().manual_seed(tokens + dv)
    x = torch.randn(tokens, heads, dv, generator=g).to(dtype)
    z = (3 * torch.randn(tokens, heads, dv, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(dv, generator=g)).to(dtype)
    out = gated_rmsnorm(x, z, w, eps=1e-6)
    ref = naive.gated_rmsnorm(x, z, w, eps=1e-6)
    assert out.shape == x.shape and rel_err(out, ref) < TOL[dtype]
