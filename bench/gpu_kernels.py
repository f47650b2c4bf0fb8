"""Prepared GPU check + benchmark of the Triton kernel library (issue 7). Builds nothing: kernels only.

    python bench/gpu_kernels.py                      # on the H200: bf16 checks + timings, both model shapes
    python bench/gpu_kernels.py --budget-s 300 --only gdn,attn
    python bench/gpu_kernels.py --cpu-smoke          # same code path, TRITON_INTERPRET=1, tiny fp32 shapes

For every case (one kernel launch pattern at the Qwen3.5-0.8B / 35B-A3B shapes of
`qwen35c.backends.triton.aot.SHAPES`):
  (a) check: the kernel on bf16 inputs (fp32 state where the kernel keeps one) against its naive twin
      run on fp32 copies of the same (bf16-rounded) values; rmse(out - ref) / rmse(ref) per output
      against a bf16 threshold (MoE full block excepted: see MOE_NOTE);
  (b) time: triton.testing.do_bench (warmup, L2 flushed each rep, median), achieved HBM bandwidth and
      FLOP/s from a per-case minimal byte / FLOP model, and the fraction of the roofline
      max(bytes / HBM, flops / peak) reached; the GDN prefill and decode cases are also timed against
      FLA's chunk_gated_delta_rule / fused_recurrent_gated_delta_rule when `fla` imports (else "not run").
  (c) a time budget (--budget-s, default 540 s): cases that would start after it are skipped and listed.
Prints a markdown table; writes JSON to $OUT/gpu_kernels.json when $OUT is set (or to --json).
Nothing is reported as checked unless it ran: every case carries status pass / FAIL / error / skipped /
n/a, and every FLA comparison says "not run" with the reason when it did not run.

Workarounds for kernel-library APIs (the kernel files are not touched):
  * the GDN and conv1d twins allocate with torch.zeros(...) without a device (CPU only); the script
    runs every twin under `with torch.device(<input device>)` so they allocate on the GPU;
  * the recurrent GDN kernel and causal_conv1d_update update their state in place: the check hands
    kernel and twin separate clones; the timing loop keeps mutating one buffer (what decode does);
  * FLA is called with keyword arguments only (in fla 0.5/0.6, positional beta would land in another
    parameter), with activated gates (g = log-decay fp32, beta = sigmoid(b)) since FLA's in-kernel
    gate options differ from ours; our kernel is timed on the very same inputs for that comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

FAMILIES = ("gated_delta_rule", "causal_conv1d", "rmsnorm", "rope", "attention", "moe", "gemm")

# rmse(out-ref)/rmse(ref) thresholds. bf16 output rounding alone gives ~1.5e-3 (half an ulp of 2^-8,
# uniformly distributed); kernels that feed bf16 operands to tl.dot add a few 1e-3 more.
BF16_TOL = {"default": 1e-2, "gated_delta_rule": 2e-2, "attention": 2e-2, "moe": 2e-2, "moe_forward": 5e-2,
            "gemm": 1e-2, "fp8_linear": 2e-2}
# fp32 under the interpreter: kernels and twins agree to ~1e-6. fp8_linear quantizes activations in the
# kernel, and the Triton interpreter mis-rounds fp32->fp8 at binade boundaries (notes §1), so it is loose.
FP32_TOL = {"default": 1e-4, "moe_forward": 1e-4, "fp8_linear": 0.3}
FLOOR = 1e-6  # absolute floor on rmse(ref)
MOE_NOTE = ("full MoE block: the router logits are rounded to bf16 as in the model, so near-tie top-k choices "
            "can differ from the twin's; its threshold is looser and the routed-id mismatch is reported")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="TRITON_INTERPRET=1, tiny fp32 shapes on CPU: exercises the code path, no GPU numbers")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip cases that would start after this (s)")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth roofline, TB/s (H200: 4.8)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense roofline, TFLOP/s (H200: 989)")
    p.add_argument("--shapes", default=None, help="comma list of aot.SHAPES names (default: all)")
    p.add_argument("--only", default=None, help="comma list of substrings; run cases whose family/name match")
    p.add_argument("--tokens", type=int, default=None, help="prefill tokens (default 4096; smoke 65)")
    p.add_argument("--decode-batch", type=int, default=None, help="decode batch (default 32; smoke 2)")
    p.add_argument("--context", type=int, default=None, help="decode KV-cache length (default 4096; smoke 70)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--tol-scale", type=float, default=1.0, help="multiply every check threshold")
    p.add_argument("--no-fla", action="store_true", help="do not import fla even if present")
    p.add_argument("--fla-smoke", action="store_true",
                   help="with --cpu-smoke: import fla anyway and run the comparison path under the interpreter "
                        "(fla's chunk kernel needs patches there and is expected to report an error)")
    p.add_argument("--no-time", action="store_true", help="checks only")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/gpu_kernels.json when $OUT is set)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.cpu_smoke:
    # Read by @triton.jit at decoration time: must be set before any kernel module (or fla) is imported.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

T0 = time.perf_counter()


# ------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------

@dataclass
class Case:
    family: str
    name: str
    shape: str
    params: dict[str, Any]
    setup: Callable[[], dict]          # returns the dict described in run_case
    status: str = "pending"            # pass | FAIL | error | skipped | n/a
    check: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    fla: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "setup"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    err = (out - ref).pow(2).mean().sqrt().item()
    base = ref.pow(2).mean().sqrt().item()
    if not math.isfinite(err):
        return float("inf")
    return err / max(base, FLOOR)


def f32(t):
    """fp32 copy of a bf16/fp16 tensor (the same rounded values); anything else unchanged."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16):
        return t.float()
    return t


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn) -> float:
    """Median milliseconds of fn(). GPU: triton.testing.do_bench (L2 flushed per rep). CPU smoke: one
    wall-clock call under the interpreter (exercises the path; not a performance number)."""
    if DEV.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=ARGS.warmup_ms, rep=ARGS.rep_ms, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def perf(ms: float, nbytes: float, flops: float) -> dict[str, Any]:
    s = ms * 1e-3
    bw, peak = ARGS.hbm_tbps * 1e12, ARGS.peak_tflops * 1e12
    t_roof = max(nbytes / bw, flops / peak)
    return {"median_ms": round(ms, 5), "bytes": int(nbytes), "flops": int(flops),
            "gbps": round(nbytes / s / 1e9, 1), "tflops": round(flops / s / 1e12, 2),
            "pct_hbm": round(100 * nbytes / s / bw, 1), "pct_peak_flops": round(100 * flops / s / peak, 1),
            "bound": "memory" if nbytes / bw >= flops / peak else "compute",
            "pct_roofline": round(100 * t_roof / s, 1)}


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def tolerance(case: Case, key: str | None = None) -> float:
    table = FP32_TOL if SMOKE else BF16_TOL
    for k in (key, case.name, case.family):
        if k and k in table:
            return table[k] * ARGS.tol_scale
    return table["default"] * ARGS.tol_scale


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------

SMOKE = ARGS.cpu_smoke
if SMOKE:
    DEV = torch.device("cpu")
    DT = torch.float32
else:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or use --cpu-smoke here")
    DEV = torch.device("cuda")
    DT = torch.bfloat16
torch.manual_seed(ARGS.seed)

from qwen35c.backends.triton import attention as attn_k  # noqa: E402
from qwen35c.backends.triton import causal_conv1d as conv_k  # noqa: E402
from qwen35c.backends.triton import gated_delta_rule as gdn_k  # noqa: E402
from qwen35c.backends.triton import gemm as gemm_k  # noqa: E402
from qwen35c.backends.triton import moe as moe_k  # noqa: E402
from qwen35c.backends.triton import rmsnorm as norm_k  # noqa: E402
from qwen35c.backends.triton import rope as rope_k  # noqa: E402
from qwen35c.backends.triton.aot import SHAPES, ModelShapes  # noqa: E402
from qwen35c.backends.triton.attention import naive as attn_n  # noqa: E402
from qwen35c.backends.triton.gemm import naive as gemm_n  # noqa: E402
from qwen35c.backends.triton.moe import naive as moe_n  # noqa: E402
from qwen35c.backends.triton.rmsnorm import naive as norm_n  # noqa: E402
from qwen35c.backends.triton.rope import naive as rope_n  # noqa: E402

FLA: dict[str, Any] = {"available": False, "reason": ""}
if ARGS.no_fla:
    FLA["reason"] = "not run: --no-fla"
elif SMOKE and not ARGS.fla_smoke:
    FLA["reason"] = "not run: --cpu-smoke (fla's autotuned chunk kernels need a GPU driver)"
else:
    try:
        import fla  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

        FLA.update(available=True, version=getattr(fla, "__version__", "?"), chunk=fla_chunk, recurrent=fla_recurrent)
    except Exception as err:  # ImportError or a broken install: say so, never pretend
        FLA["reason"] = f"not run: fla does not import ({type(err).__name__}: {str(err)[:120]})"

if SMOKE:
    TINY = ModelShapes("tiny-moe", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=4, intermediate_size=0, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    SHAPE_LIST = [TINY]
    TOKENS, DECODE_B, CONTEXT = ARGS.tokens or 65, ARGS.decode_batch or 2, ARGS.context or 70
else:
    names = ARGS.shapes.split(",") if ARGS.shapes else list(SHAPES)
    SHAPE_LIST = [SHAPES[n] for n in names]
    TOKENS, DECODE_B, CONTEXT = ARGS.tokens or 4096, ARGS.decode_batch or 32, ARGS.context or 4096
ROPE_THETA = 1e7


def rnd(*shape, scale=1.0, dtype=None):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype or DT)


# ------------------------------------------------------------------------------------------------
# Case builders. Each setup() returns:
#   kernel: () -> tuple of outputs (also what is timed, unless `timed` is given)
#   ref:    () -> tuple of outputs, the naive twin on fp32 copies
#   outputs: names of the outputs; bytes, flops: the minimal traffic / work model
#   timed (optional), fla (optional: dict(ours=fn, theirs=fn) on identical inputs), extra (optional: fn -> dict)
# ------------------------------------------------------------------------------------------------

def gdn_flops_chunk(tokens, hv, k, v, c=64):
    # per token and value head: QK^T, KK^T, W = T(bK) (2C*K each), U = T(bV), (QK^T)V' (2C*V each),
    # W S, Q S, K^T V' (2KV each); the triangular solve's C^3/3 per chunk is ignored
    return tokens * hv * (2 * c * (3 * k + 2 * v) + 6 * k * v)


def gdn_flops_recurrent(tokens, hv, k, v):
    return tokens * hv * 7 * k * v  # decay, S^T k, rank-1 update, S^T q


def gdn_inputs(S: ModelShapes, B, T):
    H, HV, K, V = S.linear_num_key_heads, S.linear_num_value_heads, S.linear_key_head_dim, S.linear_value_head_dim
    q, k = rnd(B, T, H, K), rnd(B, T, H, K)
    v = rnd(B, T, HV, V)
    a, b = rnd(B, T, HV), rnd(B, T, HV)                         # raw projections, as the model feeds them
    A_log = (torch.rand(HV, device=DEV) * 2 - 1).float()        # checkpoint-like: exp(A_log) in ~[0.4, 2.7]
    dt_bias = (torch.randn(HV, device=DEV) * 0.5).float()
    return q, k, v, a, b, A_log, dt_bias


GATE_KW = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)


def activated(a, b, A_log, dt_bias):
    g = (-A_log.exp() * torch.nn.functional.softplus(a.float() + dt_bias)).float()
    return g, torch.sigmoid(b.float()).to(b.dtype)


def case_gdn_chunk(S: ModelShapes):
    def setup():
        T = TOKENS
        q, k, v, a, b, A_log, dt_bias = gdn_inputs(S, 1, T)
        HV, K, V = S.linear_num_value_heads, S.linear_key_head_dim, S.linear_value_head_dim
        cu = torch.tensor([0, T // 2, (3 * T) // 4, T], dtype=torch.int32, device=DEV)   # 3 packed sequences
        h0 = torch.randn(3, HV, K, V, device=DEV) * 0.1
        kw = dict(GATE_KW, A_log=A_log, dt_bias=dt_bias, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        g, beta = activated(a, b, A_log, dt_bias)
        plain = dict(use_qk_l2norm_in_kernel=True, initial_state=h0, output_final_state=True)
        out = dict(
            kernel=lambda: gdn_k.chunk_gated_delta_rule(q, k, v, a, b, **kw),
            ref=lambda: gdn_k.naive_chunk_gated_delta_rule(
                *map(f32, (q, k, v, a, b)), **dict(kw, initial_state=h0.clone())),
            outputs=("o", "final_state"),
            bytes=nbytes(q, k, v, a, b, v, h0, h0),   # reads + o (v-sized) + final state (h0-sized)
            flops=gdn_flops_chunk(T, HV, K, V),
        )
        out["fla"] = dict(
            ours=lambda: gdn_k.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, **plain),
            theirs=lambda: FLA["chunk"](q=q, k=k, v=v, g=g, beta=beta, cu_seqlens=cu.long(), **plain),
        )
        return out
    return Case("gated_delta_rule", "gdn_chunk_prefill", S.name,
                {"tokens": TOKENS, "seqs": 3, "gates_in_kernel": True, "l2norm": True}, setup)


def case_gdn_recurrent(S: ModelShapes, T: int, steps: bool):
    def setup():
        B = DECODE_B
        q, k, v, a, b, A_log, dt_bias = gdn_inputs(S, B, T)
        HV, K, V = S.linear_num_value_heads, S.linear_key_head_dim, S.linear_value_head_dim
        state = torch.randn(B, HV, K, V, device=DEV) * 0.1
        timed_state = state.clone()
        kw = dict(GATE_KW, A_log=A_log, dt_bias=dt_bias, output_step_states=steps)

        def kernel(st=None):
            return gdn_k.fused_recurrent_gated_delta_rule(q, k, v, a, b, initial_state=state.clone() if st is None
                                                          else st, **kw)

        out = dict(
            kernel=kernel,
            timed=lambda: kernel(timed_state),
            ref=lambda: gdn_k.naive_recurrent_gated_delta_rule(*map(f32, (q, k, v, a, b)),
                                                               initial_state=state.clone(), **kw),
            outputs=("o", "final_state") + (("step_states",) if steps else ()),
            bytes=nbytes(q, k, v, a, b, v, state, state) + (B * T * HV * K * V * 4 if steps else 0),
            flops=gdn_flops_recurrent(B * T, HV, K, V),
        )
        if not steps:
            g, beta = activated(a, b, A_log, dt_bias)
            s1, s2 = state.clone(), state.clone()
            plain = dict(use_qk_l2norm_in_kernel=True, output_final_state=True)
            out["fla"] = dict(
                ours=lambda: gdn_k.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s1, **plain),
                theirs=lambda: FLA["recurrent"](q=q, k=k, v=v, g=g, beta=beta, initial_state=s2, **plain),
                note="ours updates the state in place; fla writes a new final state",
            )
        return out
    name = "gdn_recurrent_decode" if not steps else f"gdn_recurrent_verify_T{T}_steps"
    return Case("gated_delta_rule", name, S.name, {"batch": DECODE_B, "T": T, "step_states": steps}, setup)


def conv_channels(S: ModelShapes):
    return 2 * S.linear_num_key_heads * S.linear_key_head_dim + S.linear_num_value_heads * S.linear_value_head_dim


def case_conv(S: ModelShapes):
    def setup():
        C, W, T = conv_channels(S), S.linear_conv_kernel_dim, TOKENS
        x, w, h0 = rnd(1, T, C), rnd(C, W, scale=0.5), rnd(1, C, W - 1)
        lengths = torch.tensor([T], dtype=torch.int32, device=DEV)
        return dict(
            kernel=lambda: conv_k.causal_conv1d(x, w, None, h0, True, lengths),
            ref=lambda: conv_k.naive_causal_conv1d(f32(x), f32(w), None, f32(h0), True, lengths),
            outputs=("y", "final_state"), bytes=nbytes(x, w, h0, x, h0), flops=2 * W * T * C)
    return Case("causal_conv1d", "causal_conv1d_prefill", S.name, {"tokens": TOKENS}, setup)


def case_conv_update(S: ModelShapes):
    def setup():
        C, W, B = conv_channels(S), S.linear_conv_kernel_dim, DECODE_B
        x, w, state = rnd(B, C), rnd(C, W, scale=0.5), rnd(B, C, W - 1)
        timed_state = state.clone()

        def kernel(st=None):
            st = state.clone() if st is None else st
            return conv_k.causal_conv1d_update(x, st, w), st

        def ref():
            st = f32(state).clone()
            return conv_k.naive_causal_conv1d_update(f32(x), st, f32(w)), st

        return dict(kernel=kernel, timed=lambda: kernel(timed_state), ref=ref, outputs=("y", "conv_state"),
                    bytes=nbytes(x, w, state, x, state), flops=2 * W * B * C)
    return Case("causal_conv1d", "causal_conv1d_update", S.name, {"batch": DECODE_B}, setup)


def case_rmsnorm(S: ModelShapes, residual: bool):
    def setup():
        N = S.hidden_size
        x, r, w = rnd(TOKENS, N), rnd(TOKENS, N), rnd(N, scale=0.1)
        if residual:
            return dict(kernel=lambda: norm_k.rmsnorm(x, w, residual=r),
                        ref=lambda: norm_n.rmsnorm(f32(x), f32(w), residual=f32(r)),
                        outputs=("y", "residual_out"), bytes=nbytes(x, r, w, x, x), flops=6 * TOKENS * N)
        return dict(kernel=lambda: (norm_k.rmsnorm(x, w),), ref=lambda: (norm_n.rmsnorm(f32(x), f32(w)),),
                    outputs=("y",), bytes=nbytes(x, w, x), flops=4 * TOKENS * N)
    return Case("rmsnorm", "rmsnorm_residual" if residual else "rmsnorm", S.name, {"tokens": TOKENS}, setup)


def case_gated_rmsnorm(S: ModelShapes):
    def setup():
        HV, V = S.linear_num_value_heads, S.linear_value_head_dim
        x, z, w = rnd(TOKENS, HV, V), rnd(TOKENS, HV, V), rnd(V, scale=0.5)
        return dict(kernel=lambda: (norm_k.gated_rmsnorm(x, z, w),),
                    ref=lambda: (norm_n.gated_rmsnorm(f32(x), f32(z), f32(w)),),
                    outputs=("y",), bytes=nbytes(x, z, w, x), flops=10 * x.numel())
    return Case("rmsnorm", "gated_rmsnorm", S.name, {"tokens": TOKENS}, setup)


def case_rope(S: ModelShapes, which: str):
    def setup():
        D = S.head_dim
        R = int(D * S.partial_rotary_factor)
        heads = S.num_attention_heads if which == "q" else S.num_key_value_heads
        if which == "q":   # q is strided inside the q|gate projection [T, Hq, 2D], as the model lays it out
            x = rnd(TOKENS, heads, 2 * D)[..., :D]
        else:
            x = rnd(TOKENS, heads, D)
        w = rnd(D, scale=0.1)
        pos = torch.arange(TOKENS, dtype=torch.int32, device=DEV) + 1000
        return dict(kernel=lambda: (rope_k.qk_norm_rope(x, w, pos, ROPE_THETA, R),),
                    ref=lambda: (rope_n.qk_norm_rope(f32(x), f32(w), pos, ROPE_THETA, R),),
                    outputs=("y",), bytes=2 * TOKENS * heads * D * x.element_size(), flops=10 * TOKENS * heads * D)
    return Case("rope", f"qk_norm_rope_{which}", S.name, {"tokens": TOKENS}, setup)


def case_attn_prefill(S: ModelShapes):
    def setup():
        T, Hq, Hkv, D = TOKENS, S.num_attention_heads, S.num_key_value_heads, S.head_dim
        q, g = rnd(1, T, Hq, D), rnd(1, T, Hq, D)
        k, v = rnd(1, T, Hkv, D), rnd(1, T, Hkv, D)
        return dict(kernel=lambda: (attn_k.attention_prefill(q, k, v, g),),
                    ref=lambda: (attn_n.attention_prefill(*map(f32, (q, k, v, g))),),
                    outputs=("o",), bytes=nbytes(q, g, k, v, q), flops=2 * T * T * D * Hq)  # causal: half of 4T^2D
    return Case("attention", "attention_prefill", S.name, {"tokens": TOKENS}, setup)


def case_attn_decode(S: ModelShapes):
    def setup():
        B, Hq, Hkv, D, L = DECODE_B, S.num_attention_heads, S.num_key_value_heads, S.head_dim, CONTEXT
        q, g = rnd(B, Hq, D), rnd(B, Hq, D)
        kc, vc = rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)
        lens = torch.randint(L // 2, L + 1, (B,), dtype=torch.int32, device=DEV)
        total = int(lens.sum())
        return dict(kernel=lambda: (attn_k.attention_decode(q, kc, vc, lens, g),),
                    ref=lambda: (attn_n.attention_decode(*map(f32, (q, kc, vc)), lens, f32(g)),),
                    outputs=("o",), bytes=nbytes(q, g, q) + 2 * total * Hkv * D * kc.element_size(),
                    flops=4 * total * Hq * D)
    return Case("attention", "attention_decode", S.name, {"batch": DECODE_B, "context": CONTEXT}, setup)


def moe_weights(S: ModelShapes):
    E, Hd, I, Is = S.num_experts, S.hidden_size, S.moe_intermediate_size, S.shared_expert_intermediate_size
    return dict(router_w=rnd(E, Hd, scale=Hd ** -0.5), w13=rnd(E, 2 * I, Hd, scale=Hd ** -0.5),
                w2=rnd(E, Hd, I, scale=I ** -0.5), shared_w13=rnd(2 * Is, Hd, scale=Hd ** -0.5),
                shared_w2=rnd(Hd, Is, scale=Is ** -0.5), shared_gate_w=rnd(1, Hd, scale=Hd ** -0.5))


def moe_cost(S: ModelShapes, n: int, ids: torch.Tensor, x: torch.Tensor):
    E, Hd, I, Is, k = (S.num_experts, S.hidden_size, S.moe_intermediate_size, S.shared_expert_intermediate_size,
                       S.num_experts_per_tok)
    touched = int(ids.unique().numel())
    es = x.element_size()
    wbytes = touched * 3 * Hd * I * es + 3 * Hd * Is * es + (E + 1) * Hd * es
    flops = 6 * n * k * Hd * I + 6 * n * Hd * Is + 2 * n * Hd * (E + 1)
    return wbytes + 2 * n * Hd * es, flops, touched


def case_moe_experts(S: ModelShapes, n: int, phase: str):
    def setup():
        W = moe_weights(S)
        x = rnd(n, S.hidden_size)
        logits = torch.randn(n, S.num_experts, device=DEV)
        weights, ids = moe_n.moe_route(logits, S.num_experts_per_tok)
        touched = moe_cost(S, n, ids, x)[2]
        fl = 6 * n * S.num_experts_per_tok * S.hidden_size * S.moe_intermediate_size
        nb = touched * 3 * S.hidden_size * S.moe_intermediate_size * x.element_size() + \
            (1 + S.num_experts_per_tok) * n * S.hidden_size * x.element_size()
        return dict(kernel=lambda: (moe_k.moe_experts(x, W["w13"], W["w2"], weights, ids),),
                    ref=lambda: (moe_n.moe_experts(f32(x), f32(W["w13"]), f32(W["w2"]), weights, ids),),
                    outputs=("y_slots",), bytes=nb, flops=fl, extra=lambda: {"experts_touched": touched})
    return Case("moe", f"moe_experts_{phase}", S.name, {"tokens": n}, setup)


def case_moe_forward(S: ModelShapes, n: int, phase: str):
    def setup():
        W = moe_weights(S)
        x = rnd(n, S.hidden_size)
        k = S.num_experts_per_tok
        # the twin takes the native-dtype inputs here (it widens to fp32 internally and rounds the router
        # logits to x.dtype as the kernel does); fp32 copies would route differently on near-ties
        ref_logits = (x.float() @ W["router_w"].float().t()).to(x.dtype)
        ids_ref = moe_n.moe_route(ref_logits, k)[1]
        nb, fl, touched = moe_cost(S, n, ids_ref, x)
        args = (x, W["router_w"], W["w13"], W["w2"], k, W["shared_w13"], W["shared_w2"], W["shared_gate_w"])

        def extra():
            ids = moe_k.moe_route(gemm_k.linear(x, W["router_w"]), k)[1]   # what moe_forward routes with
            diff = (ids.sort(-1).values != ids_ref.sort(-1).values).any(-1).float().mean().item()
            return {"experts_touched": touched, "tokens_with_other_experts": round(diff, 4)}

        return dict(kernel=lambda: (moe_k.moe_forward(*args),), ref=lambda: (moe_n.moe_forward(*args),),
                    outputs=("out",), bytes=nb, flops=fl, extra=extra, tol_key="moe_forward", note=MOE_NOTE)
    return Case("moe", f"moe_forward_{phase}", S.name, {"tokens": n}, setup)


def gemm_dims(S: ModelShapes):
    return 2 * S.num_attention_heads * S.head_dim, S.hidden_size   # the q|gate projection: N, K


def case_gemm(S: ModelShapes, kind: str, m: int, phase: str):
    def setup():
        N, K = gemm_dims(S)
        x, w = rnd(m, K), rnd(N, K, scale=K ** -0.5)
        fl = 2 * m * N * K
        es = x.element_size()
        if kind == "bf16":
            return dict(kernel=lambda: (gemm_k.linear(x, w),), ref=lambda: (gemm_n.linear(f32(x), f32(w)),),
                        outputs=("y",), bytes=nbytes(x, w) + m * N * es, flops=fl)
        if kind in ("fp8", "fp8_block"):
            wq, ws = gemm_n.fp8_quantize_weight_blocks(w)
            nb = m * K * es + nbytes(wq, ws) + m * N * es
            if kind == "fp8":
                return dict(kernel=lambda: (gemm_k.fp8_linear(x, wq, ws),),
                            ref=lambda: (gemm_n.fp8_linear(f32(x), wq, ws),),
                            outputs=("y",), bytes=nb, flops=fl, tol_key="fp8_linear")
            xq, xs = gemm_n.fp8_quantize_activations(x)
            return dict(kernel=lambda: (gemm_k.fp8_block_linear(xq, xs, wq, ws, out_dtype=DT),),
                        ref=lambda: (gemm_n.fp8_block_linear(xq, xs, wq, ws, out_dtype=torch.float32),),
                        outputs=("y",), bytes=nbytes(xq, xs, wq, ws) + m * N * es, flops=fl)
        qw, sc, _ = gemm_n.int4_pack(w, 128)
        return dict(kernel=lambda: (gemm_k.int4_linear(x, qw, sc),),
                    ref=lambda: (gemm_n.int4_linear(f32(x), qw, f32(sc)),),
                    outputs=("y",), bytes=nbytes(x, qw, sc) + m * N * es, flops=fl)
    name = {"bf16": "gemm_bf16", "fp8": "fp8_linear", "fp8_block": "gemm_fp8_block", "int4": "gemm_int4_g128"}[kind]
    return Case("gemm", f"{name}_{phase}", S.name, {"M": m, "N": gemm_dims(S)[0], "K": gemm_dims(S)[1]}, setup)


def build_cases() -> list[Case]:
    """Ordered by value: every family once at the first shape before anything else, GDN first."""
    per_shape: list[list[Case]] = []
    for S in SHAPE_LIST:
        cases = [
            case_gdn_chunk(S), case_gdn_recurrent(S, 1, False), case_gdn_recurrent(S, 4, True),
            case_conv(S), case_conv_update(S),
            case_rmsnorm(S, False), case_rmsnorm(S, True), case_gated_rmsnorm(S),
            case_rope(S, "q"), case_rope(S, "k"),
            case_attn_prefill(S), case_attn_decode(S),
        ]
        if S.num_experts:
            cases += [case_moe_experts(S, DECODE_B, "decode"), case_moe_forward(S, DECODE_B, "decode"),
                      case_moe_experts(S, TOKENS, "prefill"), case_moe_forward(S, TOKENS, "prefill")]
        else:
            cases.append(Case("moe", "moe_*", S.name, {}, lambda: {}, status="n/a",
                              note="dense model: no MoE layers"))
        for m, phase in ((DECODE_B, "decode"), (TOKENS, "prefill")):
            cases += [case_gemm(S, "bf16", m, phase), case_gemm(S, "fp8_block", m, phase),
                      case_gemm(S, "fp8", m, phase), case_gemm(S, "int4", m, phase)]
        per_shape.append(cases)
    ordered = [c for cases in per_shape for c in cases]
    if ARGS.only:
        keys = [s.strip() for s in ARGS.only.split(",") if s.strip()]
        ordered = [c for c in ordered if any(k in c.family or k in c.name for k in keys)]
    return ordered


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

def as_tuple(x):
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


def run_case(case: Case) -> None:
    spec = case.setup()
    case.note = spec.get("note", case.note)
    outs = as_tuple(spec["kernel"]())
    sync()
    with torch.device(DEV):          # the GDN / conv twins allocate without a device argument
        refs = as_tuple(spec["ref"]())
    sync()
    tol = tolerance(case, spec.get("tol_key"))
    errs = {}
    for name, o, r in zip(spec["outputs"], outs, refs):
        if o is None or r is None:
            raise RuntimeError(f"output {name}: kernel gave {type(o).__name__}, twin gave {type(r).__name__}")
        if tuple(o.shape) != tuple(r.shape):
            raise RuntimeError(f"output {name}: shape {tuple(o.shape)} vs twin {tuple(r.shape)}")
        errs[name] = rel_err(o, r)
    passed = all(e <= tol for e in errs.values())
    case.check = {"rel_rmse": {k: float(f"{v:.3g}") for k, v in errs.items()}, "tol": tol, "passed": passed,
                  "dtype": str(DT).replace("torch.", "")}
    if "extra" in spec:
        case.check.update(spec["extra"]())
    case.status = "pass" if passed else "FAIL"
    del outs, refs
    if not ARGS.no_time:
        fn = spec.get("timed", spec["kernel"])
        case.timing = perf(time_fn(fn), spec["bytes"], spec["flops"])
        if SMOKE:
            case.timing["note"] = "one interpreted CPU call: exercises the path, not a GPU number"
    fla = spec.get("fla")
    if fla is not None:
        if not FLA["available"]:
            case.fla = {"status": FLA["reason"]}
        elif ARGS.no_time:
            case.fla = {"status": "not run: --no-time"}
        else:
            try:
                ours, theirs = as_tuple(fla["ours"]()), as_tuple(fla["theirs"]())
                sync()
                agree = {n: float(f"{rel_err(a, b):.3g}") for n, a, b in zip(("o", "final_state"), ours, theirs)
                         if a is not None and b is not None}
                del ours, theirs
                t_ours, t_fla = time_fn(fla["ours"]), time_fn(fla["theirs"])
                case.fla = {"status": "run", "fla_version": FLA["version"], "ours_ms": round(t_ours, 5),
                            "fla_ms": round(t_fla, 5), "speedup_vs_fla": round(t_fla / t_ours, 3),
                            "rel_rmse_ours_vs_fla": agree, "inputs": "activated gates (g fp32, sigmoid(b))",
                            **({"note": fla["note"]} if "note" in fla else {})}
            except Exception as err:
                case.fla = {"status": f"error: {type(err).__name__}: {str(err).strip()[:200]}"}
    del spec


def main() -> int:
    cases = build_cases()
    budget = ARGS.budget_s
    for case in cases:
        if case.status == "n/a":
            continue
        elapsed = time.perf_counter() - T0
        if elapsed >= budget:
            case.status = "skipped"
            case.note = f"time budget: {elapsed:.0f} s of {budget:.0f} s spent before it started"
            continue
        start = time.perf_counter()
        try:
            run_case(case)
        except Exception as err:
            case.status = "error"
            case.error = f"{type(err).__name__}: {str(err).strip()[:300]}"
        case.timing.setdefault("case_wall_s", round(time.perf_counter() - start, 2))
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - T0:6.1f}s] {case.status:7s} {case.shape:9s} {case.name}"
              + (f"  {case.error}" if case.error else ""), file=sys.stderr, flush=True)

    report(cases)
    bad = [c for c in cases if c.status in ("FAIL", "error")]
    return 1 if bad else 0


def fmt(v, spec="{:.3g}"):
    return "" if v is None else spec.format(v)


def report(cases: list[Case]) -> None:
    elapsed = time.perf_counter() - T0
    families = {}
    for fam in FAMILIES:
        mine = [c for c in cases if c.family == fam]
        ran = [c for c in mine if c.status in ("pass", "FAIL")]
        if ran:
            families[fam] = {"checked": len(ran), "passed": sum(c.status == "pass" for c in ran),
                             "status": "checked"}
        elif any(c.status == "error" for c in mine):
            families[fam] = {"checked": 0, "passed": 0, "status": "error"}
        else:
            families[fam] = {"checked": 0, "passed": 0, "status": "not run"}
    skipped = [f"{c.name}[{c.shape}]" for c in cases if c.status == "skipped"]

    device = torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    import triton

    mode = "cpu-smoke" if SMOKE else "gpu"
    lines = [f"## Triton kernels vs naive twins ({mode}: {device}, {str(DT).replace('torch.', '')} inputs)", "",
             f"Roofline: HBM {ARGS.hbm_tbps} TB/s, dense {ARGS.peak_tflops} TFLOP/s. Check: rmse(out-ref)/rmse(ref) "
             f"per output vs fp32 twin. Prefill tokens {TOKENS}, decode batch {DECODE_B}, KV context {CONTEXT}.", "",
             "| shape | case | status | rel rmse per output (tol) | median ms | GB/s | %HBM | TFLOP/s | %peak | "
             "%roofline | FLA ms | FLA/ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        chk = ", ".join(f"{k} {v:.2g}" for k, v in c.check.get("rel_rmse", {}).items())
        if chk:
            chk += f" ({c.check['tol']:.0e})"
        elif c.status in ("skipped", "n/a"):
            chk = c.note
        elif c.error:
            chk = c.error[:80].replace("|", "/")
        t = c.timing
        fla = c.fla
        fla_ms = fmt(fla.get("fla_ms"), "{:.4f}") if fla.get("status") == "run" else (
            fla.get("status", "")[:40] if fla else "")
        ratio = fmt(fla.get("speedup_vs_fla"), "{:.2f}") if fla.get("status") == "run" else ""
        lines.append(f"| {c.shape} | {c.name} | {c.status} | {chk} | {fmt(t.get('median_ms'), '{:.4f}')} | "
                     f"{fmt(t.get('gbps'), '{:.0f}')} | {fmt(t.get('pct_hbm'), '{:.1f}')} | "
                     f"{fmt(t.get('tflops'), '{:.2f}')} | {fmt(t.get('pct_peak_flops'), '{:.1f}')} | "
                     f"{fmt(t.get('pct_roofline'), '{:.1f}')} | {fla_ms} | {ratio} |")
    lines += ["", "Families: " + ", ".join(f"{f} {v['status']} ({v['passed']}/{v['checked']} pass)"
                                            for f, v in families.items())]
    lines.append(f"FLA: {('fla ' + FLA['version']) if FLA['available'] else FLA['reason']}")
    lines.append(f"Skipped for the time budget ({ARGS.budget_s:.0f} s): {', '.join(skipped) if skipped else 'none'}")
    lines.append(f"Total wall time: {elapsed:.1f} s")
    if SMOKE:
        lines.append("cpu-smoke: timings are single interpreted CPU calls and the roofline columns mean nothing.")
    print("\n".join(lines), flush=True)

    result = {
        "mode": mode, "device": device, "dtype": str(DT).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "fla": FLA.get("version")},
        "roofline": {"hbm_tbps": ARGS.hbm_tbps, "peak_tflops": ARGS.peak_tflops},
        "sizes": {"tokens": TOKENS, "decode_batch": DECODE_B, "context": CONTEXT,
                  "shapes": [s.name for s in SHAPE_LIST]},
        "budget_s": ARGS.budget_s, "elapsed_s": round(elapsed, 1), "skipped": skipped,
        "families": families, "fla": FLA["reason"] if not FLA["available"] else f"fla {FLA['version']}",
        "cases": [c.as_dict() for c in cases],
    }
    path = ARGS.json or (os.path.join(os.environ["OUT"], "gpu_kernels.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
