"""Causal depthwise conv1d + SiLU kernels (Triton interpreter, fp32) against the naive twin and F.conv1d."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch
import torch.nn.functional as F

from qwen35c.backends.triton.causal_conv1d import (
    causal_conv1d, causal_conv1d_update, naive_causal_conv1d, naive_causal_conv1d_update,
)

W = 4


# ratio measured worst 7.6e-8 (rmse / ref rmse), floor 1.4e-7 (rmse), 1 and 2 threads
def assert_close(name, ref, out, ratio=1e-6, floor=1e-6):
    err = (out.float() - ref.float()).pow(2).mean().sqrt().item()
    base = ref.float().pow(2).mean().sqrt().item()
    assert err <= max(ratio * base, floor), f"{name}: rmse {err:.3g}, ref rmse {base:.3g}"


def inputs(B, T, C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=gen), torch.randn(C, W, generator=gen),
            torch.randn(B, C, W - 1, generator=gen))


def torch_conv(x, weight, state):
    """F.conv1d over [state | x] with the depthwise weight, then SiLU: the independent oracle."""
    xs = torch.cat([state, x.transpose(1, 2)], dim=2)
    return F.silu(F.conv1d(xs, weight[:, None, :], groups=x.shape[2])).transpose(1, 2)


@pytest.mark.parametrize("T", [1, 3, 15, 64, 65])
def test_prefill_matches_conv1d_and_naive(T):
    x, w, h0 = inputs(2, T, 40)
    y, s = causal_conv1d(x, w, initial_state=h0, output_final_state=True)
    assert_close("y vs F.conv1d", torch_conv(x, w, h0), y)
    ref_y, ref_s = naive_causal_conv1d(x, w, initial_state=h0, output_final_state=True)
    assert_close("y vs naive", ref_y, y)
    assert_close("final_state", ref_s, s, ratio=0, floor=0)
    assert_close("final_state vs history", torch.cat([h0, x.transpose(1, 2)], 2)[:, :, -(W - 1):], s, 0, 0)


def test_prefill_zero_state_bias_and_no_activation():
    x, w, _ = inputs(1, 20, 16)
    bias = torch.randn(16)
    y, s = causal_conv1d(x, w, bias=bias, activation=None)
    assert s is None
    ref = F.conv1d(x.transpose(1, 2), w[:, None, :], bias, padding=W - 1, groups=16)[:, :, :20].transpose(1, 2)
    assert_close("y", ref, y)
    ref_y, _ = naive_causal_conv1d(x, w, bias=bias, activation=None)
    assert_close("y vs naive", ref_y, y)


def test_lengths_right_padded_rows():
    """Row b's final state is the last W-1 inputs before lengths[b], reaching into the initial state."""
    x, w, h0 = inputs(4, 12, 24)
    lengths = torch.tensor([12, 7, 2, 0], dtype=torch.int32)
    y, s = causal_conv1d(x, w, initial_state=h0, output_final_state=True, lengths=lengths)
    ref_y, ref_s = naive_causal_conv1d(x, w, initial_state=h0, output_final_state=True, lengths=lengths)
    assert_close("y", ref_y, y)
    assert_close("final_state", ref_s, s, 0, 0)
    for b in range(4):   # each row alone, truncated to its length, gives the same state
        n = int(lengths[b])
        _, s_b = naive_causal_conv1d(x[b:b + 1, :n], w, initial_state=h0[b:b + 1], output_final_state=True)
        assert_close(f"final_state[{b}]", s_b[0], s[b], 0, 0)


@pytest.mark.parametrize("T", [1, 3])
def test_update_in_place_matches_prefill(T):
    x, w, h0 = inputs(2, 10 + T, 40)
    ref_y, ref_s = causal_conv1d(x, w, initial_state=h0, output_final_state=True)
    _, state = causal_conv1d(x[:, :10], w, initial_state=h0, output_final_state=True)
    y = causal_conv1d_update(x[:, 10:] if T > 1 else x[:, 10], state, w)
    assert y.shape == ((2, T, 40) if T > 1 else (2, 40))
    assert_close("y", ref_y[:, 10:], y.reshape(2, T, 40))
    assert_close("state (in place)", ref_s, state, 0, 0)
    state_ref = h0.clone()
    naive_y = naive_causal_conv1d_update(x[:, :T], state_ref, w)
    state_k = h0.clone()
    assert_close("update vs naive", naive_y, causal_conv1d_update(x[:, :T], state_k, w))
    assert_close("state vs naive", state_ref, state_k, 0, 0)
