"""MoE routing, sort, grouped expert GEMMs and combine vs the fp32 twins under the Triton CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from qwen35c.backends.triton.moe import moe_align, moe_combine, moe_experts, moe_forward, moe_route, naive, shared_expert

# Bounds ~10x the worst measured over the test grid (1 and 2 threads), the measured value beside each.
TOL = {torch.float32: 4e-6, torch.float16: 3e-3}  # measured 3.5e-7 / 4.4e-4


def rel_err(out, ref, floor=1e-6):
    return ((out.float() - ref.float()).pow(2).mean().sqrt() / max(ref.float().pow(2).mean().sqrt().item(), floor)).item()


def skewed_logits(n, e, seed):
    """Routing that is uneven on purpose: expert 0 is popular, the last expert never chosen."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    logits[:, 0] += 3.0
    logits[:, -1] = -30.0
    return logits


@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (63, 16, 4), (65, 256, 8)])
def test_route(n, e, k):
    logits = skewed_logits(n, e, n + e)
    w, ids = moe_route(logits, k)
    w_ref, ids_ref = naive.moe_route(logits, k)
    assert ids.dtype == torch.int32 and torch.equal(ids, ids_ref)
    assert torch.allclose(w, w_ref, atol=1e-6) and torch.allclose(w.sum(-1), torch.ones(n), atol=1e-6)


def test_align_structure():
    ids = torch.tensor([[0, 2], [0, 3], [0, 2], [3, 0]], dtype=torch.int32)  # expert 1 has no tokens
    sorted_slots, block_expert, num_padded = moe_align(ids, num_experts=5, block_m=4)
    total = int(num_padded)
    assert total == 4 * 3  # experts 0 (4 slots), 2 (2 slots), 3 (2 slots) -> one block each
    blocks = sorted_slots[:total].view(-1, 4)
    assert block_expert[: total // 4].tolist() == [0, 2, 3]
    for blk, e in zip(blocks, block_expert.tolist()):
        real = blk[blk < ids.numel()].long()
        assert (ids.view(-1)[real] == e).all()
    assert sorted(sorted_slots[sorted_slots < ids.numel()].tolist()) == list(range(ids.numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,e,k,h,inter", [(1, 4, 2, 64, 32), (63, 8, 2, 64, 48), (65, 16, 4, 32, 64)])
def test_experts_uneven_with_an_empty_expert(n, e, k, h, inter, dtype):
    g = torch.Generator().manual_seed(n * e)
    x = torch.randn(n, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = naive.moe_route(skewed_logits(n, e, n), k)
    assert not (ids == e - 1).any()  # an expert with zero tokens
    y = moe_experts(x, w13, w2, weights, ids)
    ref = naive.moe_experts(x, w13, w2, weights, ids)
    assert y.shape == (n, k, h) and rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 65])
def test_forward_with_shared_expert(n, dtype):
    e, k, h, inter, shared_inter = 8, 2, 64, 32, 48
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, h, generator=g).to(dtype)
    router = torch.randn(e, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter ** 0.5).to(dtype)
    s13 = (torch.randn(2 * shared_inter, h, generator=g) / h ** 0.5).to(dtype)
    s2 = (torch.randn(h, shared_inter, generator=g) / shared_inter ** 0.5).to(dtype)
    sg = (torch.randn(1, h, generator=g) / h ** 0.5).to(dtype)
    out = moe_forward(x, router, w13, w2, k, s13, s2, sg)
    ref = naive.moe_forward(x, router, w13, w2, k, s13, s2, sg)
    assert out.shape == (n, h) and out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    assert rel_err(shared_expert(x, s13, s2), naive.shared_expert(x, s13, s2)) < TOL[dtype]
    no_shared = moe_forward(x, router, w13, w2, k)
    assert rel_err(no_shared, naive.moe_forward(x, router, w13, w2, k)) < TOL[dtype]


def test_combine():
    y = torch.randn(5, 3, 40)
    shared = torch.randn(5, 40)
    gate = torch.randn(5, 1)
    assert rel_err(moe_combine(y, shared, gate), naive.moe_combine(y, shared, gate)) < 3e-7  # measured 2.4e-8
    assert rel_err(moe_combine(y), naive.moe_combine(y)) < 3e-7  # measured 0
