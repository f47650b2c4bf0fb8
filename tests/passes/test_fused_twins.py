"""Fused and lowered ops against their naive twins (chunk edges, grouped values, padding, state)."""

from __future__ import annotations

import pytest
import torch

from qwen35c.passes.fuse_deltanet import gated_deltanet_naive, gated_deltanet_ref
from qwen35c.passes.lower_moe import grouped_linear_naive, grouped_linear_ref, moe_sort_ref

NK, NV, DK, DV, K = 2, 4, 16, 12, 4  # grouped values (nv = 2 nk) and a head dim that is not a power of 2


def _rel(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("length", [1, 15, 63, 64, 65, 130])
@pytest.mark.parametrize("chunk", [16, 64])
def test_gated_deltanet_chunked_matches_naive(length, chunk):
    gen = torch.Generator().manual_seed(length * 7 + chunk)
    channels = 2 * NK * DK + NV * DV
    mixed = torch.randn(3, length, channels, generator=gen)
    a, b = torch.randn(3, length, NV, generator=gen), torch.randn(3, length, NV, generator=gen)
    conv_w = torch.randn(channels, K, generator=gen) * 0.5
    a_log = torch.empty(NV).uniform_(0, 2.5, generator=gen)
    dt_bias = torch.randn(NV, generator=gen)
    conv_state = torch.randn(3, channels, K - 1, generator=gen)
    state = torch.randn(3, NV, DK, DV, generator=gen)
    lengths = torch.tensor([length, max(1, length // 2), max(1, length - 1)])
    args = (mixed, a, b, conv_w, a_log, dt_bias, conv_state, state, lengths)
    dims = dict(num_k_heads=NK, num_v_heads=NV, head_k_dim=DK, head_v_dim=DV, chunk_size=chunk)
    o, conv_new, s_new = gated_deltanet_ref(*args, **dims)
    o_n, conv_n, s_n = gated_deltanet_naive(*args, **dims)
    for b_ in range(3):  # outputs at padded steps are unspecified; compare valid steps only
        n = int(lengths[b_])
        assert _rel(o[b_, :n], o_n[b_, :n]) < 1e-5
    assert torch.equal(conv_new, conv_n)
    assert _rel(s_new, s_n) < 1e-5


def test_gated_deltanet_padding_leaves_state_untouched():
    gen = torch.Generator().manual_seed(0)
    channels = 2 * NK * DK + NV * DV
    dims = dict(num_k_heads=NK, num_v_heads=NV, head_k_dim=DK, head_v_dim=DV, chunk_size=16)
    base = [torch.randn(1, 20, channels, generator=gen), torch.randn(1, 20, NV, generator=gen),
            torch.randn(1, 20, NV, generator=gen), torch.randn(channels, K, generator=gen),
            torch.rand(NV, generator=gen), torch.randn(NV, generator=gen),
            torch.zeros(1, channels, K - 1), torch.zeros(1, NV, DK, DV)]
    short = gated_deltanet_ref(*[t[:, :12] if t.dim() == 3 and t.shape[1] == 20 else t for t in base],
                               torch.tensor([12]), **dims)
    padded = gated_deltanet_ref(*base, torch.tensor([12]), **dims)
    assert torch.allclose(short[2], padded[2], atol=1e-6)
    assert torch.equal(short[1], padded[1])


def test_grouped_linear_matches_naive_twin():
    gen = torch.Generator().manual_seed(3)
    experts = torch.randint(0, 5, (7, 2), generator=gen)
    order, sorted_experts = moe_sort_ref(experts, 5)
    rows = torch.randn(7, 2, 8, generator=gen)
    w = torch.randn(5, 6, 8, generator=gen)
    torch.testing.assert_close(grouped_linear_ref(rows, w, sorted_experts),
                               grouped_linear_naive(rows, w, sorted_experts), rtol=1e-5, atol=1e-5)
    assert torch.equal(sorted_experts.reshape(-1), experts.reshape(-1)[order.reshape(-1)])
