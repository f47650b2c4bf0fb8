"""Gated delta rule kernels (Triton interpreter, fp32) against the naive twins and HF's torch functions.

Error metric: rmse(out - ref) / rmse(ref), with an absolute floor for near-zero references.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch
import torch.nn.functional as F

from qwen35c.backends.triton.gated_delta_rule import (
    chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)

RATIO = 1.5e-5  # rmse / ref rmse; measured worst 1.4e-6 (naive chunk vs recurrent), 1 and 2 threads
FLOOR = 3e-6    # rmse; measured worst 2.6e-7


def assert_close(name, ref, out, ratio=RATIO, floor=FLOOR):
    ref, out = ref.float(), out.float()
    err = (out - ref).pow(2).mean().sqrt().item()
    base = ref.pow(2).mean().sqrt().item()
    assert err <= max(ratio * base, floor), f"{name}: rmse {err:.3g}, ref rmse {base:.3g}, ratio {err / max(base, 1e-30):.3g}"


def make_inputs(B, T, H, HV, K, V, gate="normal", seed=0, raw_gates=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    if raw_gates:   # raw a, b projections; A_log and dt_bias as in the checkpoint
        a = torch.randn(B, T, HV, generator=gen)
        b = torch.randn(B, T, HV, generator=gen)
        A_log = torch.randn(HV, generator=gen) * 0.5
        dt_bias = torch.randn(HV, generator=gen) * 0.5
        return q, k, v, a, b, A_log, dt_bias
    scale = {"normal": 1.0, "near_zero": 1e-3, "strong": 8.0}[gate]
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen)) * scale
    beta = torch.rand(B, T, HV, generator=gen)
    return q, k, v, g, beta


def random_state(N, HV, K, V, seed=1):
    return torch.randn(N, HV, K, V, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- naive twins and HF

@pytest.mark.parametrize("T", [1, 63, 64, 129])
@pytest.mark.parametrize("ratio", [1, 3])
def test_naive_chunk_matches_naive_recurrent(T, ratio):
    q, k, v, g, beta = make_inputs(2, T, 2, 2 * ratio, 16, 24)
    h0 = random_state(2, 2 * ratio, 16, 24)
    ref_o, ref_s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True, inplace_final_state=False)
    o, s = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)
    assert_close("o", ref_o, o)
    assert_close("final_state", ref_s, s)


def _hf_functions():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    def unwrap(fn):
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        return fn
    return unwrap(m.torch_chunk_gated_delta_rule), unwrap(m.torch_recurrent_gated_delta_rule)


@pytest.mark.parametrize("T", [15, 65])
def test_naive_matches_hf(T):
    hf_chunk, hf_recurrent = _hf_functions()
    q, k, v, g, beta = make_inputs(1, T, 2, 4, 16, 16)
    h0 = random_state(1, 4, 16, 16)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref_o, ref_s = hf_recurrent(q, k, v, g, beta, **kw)
    o, s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, inplace_final_state=False, **kw)
    assert_close("o vs hf recurrent", ref_o, o)
    assert_close("state vs hf recurrent", ref_s, s)
    ref_o, ref_s = hf_chunk(q, k, v, g, beta, **kw)
    o, s = naive_chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_close("o vs hf chunk", ref_o, o)
    assert_close("state vs hf chunk", ref_s, s)


# ---------------------------------------------------------------- chunked kernel

@pytest.mark.parametrize("T", [1, 15, 63, 64, 65, 127, 129, pytest.param(300, marks=pytest.mark.slow)])
def test_chunk_lengths(T):
    q, k, v, g, beta = make_inputs(1, T, 1, 2, 32, 32)
    h0 = random_state(1, 2, 32, 32)
    ref_o, ref_s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True, inplace_final_state=False)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
    assert_close("o", ref_o, o)
    assert_close("final_state", ref_s, s)


@pytest.mark.parametrize(("ratio", "zero_state"), [(1, False), (2, True), (3, False)])
def test_chunk_grouped_heads_and_state(ratio, zero_state):
    H, K, V = 2, 16, 16
    q, k, v, g, beta = make_inputs(2, 66, H, H * ratio, K, V, seed=ratio)   # B = 2: batch rows as sequences
    h0 = None if zero_state else random_state(2, H * ratio, K, V)
    ref_o, ref_s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True, inplace_final_state=False)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
    assert_close("o", ref_o, o)
    assert_close("final_state", ref_s, s)


@pytest.mark.parametrize("gate", ["near_zero", "strong"])
def test_chunk_gate_extremes(gate):
    q, k, v, g, beta = make_inputs(1, 100, 1, 1, 16, 16, gate=gate)
    h0 = random_state(1, 1, 16, 16)
    ref_o, ref_s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True, inplace_final_state=False)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
    assert_close("o", ref_o, o)
    assert_close("final_state", ref_s, s)


def test_chunk_fused_gates_no_l2norm_and_scale():
    q, k, v, a, b, A_log, dt_bias = make_inputs(1, 70, 1, 2, 16, 16, raw_gates=True)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)   # unit keys keep the un-normalised rule stable
    kw = dict(scale=0.3, output_final_state=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
              use_beta_sigmoid_in_kernel=True)
    ref_o, ref_s = naive_recurrent_gated_delta_rule(q, k, v, a, b, inplace_final_state=False, **kw)
    o, s = chunk_gated_delta_rule(q, k, v, a, b, **kw)
    assert_close("o", ref_o, o)
    assert_close("final_state", ref_s, s)
    g = -A_log.exp() * F.softplus(a + dt_bias)   # the gate formula, spelled out once
    ref_o2, _ = naive_recurrent_gated_delta_rule(q, k, v, g, torch.sigmoid(b), scale=0.3)
    assert_close("o vs explicit gates", ref_o2, o)


def test_chunk_varlen_matches_per_sequence():
    lengths = [5, 64, 70]
    N, H, HV, K, V = len(lengths), 1, 2, 16, 16
    q, k, v, g, beta = make_inputs(1, sum(lengths), H, HV, K, V)
    h0 = random_state(N, HV, K, V)
    cu = torch.tensor([0, 5, 69, 139], dtype=torch.int64)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, cu_seqlens=cu.to(torch.int32))
    for n in range(N):
        sl = slice(cu[n].item(), cu[n + 1].item())
        ref_o, ref_s = naive_recurrent_gated_delta_rule(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=h0[n:n + 1], output_final_state=True,
            use_qk_l2norm_in_kernel=True, inplace_final_state=False)
        assert_close(f"o[{n}]", ref_o, o[:, sl])
        assert_close(f"final_state[{n}]", ref_s[0], s[n])
    o64, s64 = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    assert_close("o int64 cu_seqlens", o, o64, ratio=0, floor=0)
    assert_close("state int64 cu_seqlens", s, s64, ratio=0, floor=0)


def test_chunk_rejects_bad_state_shape():
    q, k, v, g, beta = make_inputs(2, 4, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 1, 16, 16))


# ---------------------------------------------------------------- recurrent (decode) kernel

@pytest.mark.parametrize("ratio", [1, 2])
def test_recurrent_matches_naive_and_updates_in_place(ratio):
    q, k, v, g, beta = make_inputs(2, 6, 1, ratio, 32, 32)
    h0 = random_state(2, ratio, 32, 32)
    ref_o, ref_s, ref_steps = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
        inplace_final_state=False, output_step_states=True)
    state = h0.clone()
    o, s, steps = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                   use_qk_l2norm_in_kernel=True, output_step_states=True)
    assert s is state
    assert_close("o", ref_o, o)
    assert_close("final_state (in place)", ref_s, state)
    assert_close("step_states", ref_steps, steps)
    assert_close("last step == final", steps[:, -1], state, ratio=0, floor=0)


def test_decode_steps_match_prefill():
    """Prefill 65 tokens with the chunked kernel, then decode 3 tokens one at a time in place."""
    T0, steps = 65, 3
    q, k, v, a, b, A_log, dt_bias = make_inputs(1, T0 + steps, 1, 2, 16, 16, raw_gates=True)
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
              use_beta_sigmoid_in_kernel=True)
    ref_o, ref_s = chunk_gated_delta_rule(q, k, v, a, b, output_final_state=True, **kw)
    o0, state = chunk_gated_delta_rule(q[:, :T0], k[:, :T0], v[:, :T0], a[:, :T0], b[:, :T0],
                                       output_final_state=True, **kw)
    outs = [o0]
    for t in range(T0, T0 + steps):
        sl = slice(t, t + 1)
        o_t, _ = fused_recurrent_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], a[:, sl], b[:, sl],
                                                  initial_state=state, **kw)
        outs.append(o_t)
    assert_close("o", ref_o, torch.cat(outs, dim=1))
    assert_close("final_state", ref_s, state)


def test_recurrent_varlen_rollback_states():
    """Speculative verification: 2 sequences of 3 draft tokens packed; a rejected suffix rolls back."""
    q, k, v, g, beta = make_inputs(1, 6, 1, 2, 16, 16)
    h0 = random_state(2, 2, 16, 16)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    state = h0.clone()
    o, _, steps = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=cu,
                                                   use_qk_l2norm_in_kernel=True, output_step_states=True)
    for n in range(2):
        sl = slice(3 * n, 3 * n + 3)
        ref_o, _, ref_steps = naive_recurrent_gated_delta_rule(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=h0[n:n + 1],
            use_qk_l2norm_in_kernel=True, inplace_final_state=False, output_step_states=True)
        assert_close(f"o[{n}]", ref_o, o[:, sl])
        assert_close(f"steps[{n}]", ref_steps[0], steps[0, sl])
        assert_close(f"final[{n}]", ref_steps[0, -1], state[n])
    # accept 1 token of sequence 0: its state is step 0; re-running from it reproduces token 1
    rolled = steps[0, 0][None].clone()
    o1, _ = fused_recurrent_gated_delta_rule(q[:, 1:2], k[:, 1:2], v[:, 1:2], g[:, 1:2], beta[:, 1:2],
                                             initial_state=rolled, use_qk_l2norm_in_kernel=True)
    assert_close("replay after rollback", o[:, 1:2], o1)
