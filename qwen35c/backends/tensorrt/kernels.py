"""The TensorRT plugins' kernels: adapters in TensorRT's AOT calling convention over the library's kernels.

TensorRT launches an ahead-of-time plugin kernel with its arguments in one order: the input
pointers, the extra scalar arguments, the output pointers (then the constexprs, which are compiled
in). Each adapter takes that order and calls a kernel of `qwen35c.backends.triton` with the
binding the plugin fixes (`plugins.plugin_defs`); Triton inlines the call, so the compiled kernel is
the library's. Imported after `qwen35c.backends.triton.mode.ensure()` like every kernel module.
"""

from __future__ import annotations

from qwen35c.backends.triton import mode as _mode

_mode.ensure()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen35c.backends.triton.causal_conv1d.kernel import causal_conv1d_fwd_kernel, conv_block_sizes  # noqa: E402
from qwen35c.backends.triton.gated_delta_rule.fused_recurrent import (  # noqa: E402
    gdn_fused_recurrent_fwd_kernel, recurrent_block_sizes)
from qwen35c.backends.triton.gemm.fp8 import fp8_dynamic_expert_gemv_kernel, fp8_dynamic_gemm_kernel  # noqa: E402

FP8_TILE = (16, 64)     # (BLOCK_M, BLOCK_N): the library's decode tile; one specialisation serves every M


@triton.jit
def conv_plugin_kernel(x, weight, state, lengths, T, y, state_out,
                       C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """qwen35c::CausalConv1d: grid (cdiv(T, BT), cdiv(C, BC), B); no bias (Qwen3.5's conv has none)."""
    causal_conv1d_fwd_kernel(x, weight, x, state, state_out, lengths, y, T, C, W, BT, BC, BS,
                             False, True, True, True, True)


@triton.jit
def gdn_plugin_kernel(q, k, v, a, b, A_log, dt_bias, state, T, o, state_out,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr):
    """qwen35c::GatedDeltaRule: grid (cdiv(V, BV), B * HV); gates, L2 norms and scale in-kernel."""
    gdn_fused_recurrent_fwd_kernel(q, k, v, a, b, A_log, dt_bias, o, state, state_out, o, a, SCALE, T,
                                   H, HV, K, V, BK, BV,
                                   True, True, True, True, True, True, False, False)


@triton.jit
def fp8_plugin_kernel(x, weight, scale, M, N, K, y,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                      EMULATE_E4M3: tl.constexpr):
    """qwen35c::Fp8Linear: grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)); rows of x, W and y contiguous."""
    fp8_dynamic_gemm_kernel(x, weight, scale, y, M, N, K, K, K, (K + 127) // 128, N,
                            BLOCK_M, BLOCK_N, GROUP_M, EMULATE_E4M3)


@triton.jit
def fp8_expert_plugin_kernel(x, experts, weight, scale, N, K, y,
                             BLOCK_N: tl.constexpr, EMULATE_E4M3: tl.constexpr):
    """qwen35c::Fp8ExpertLinear: grid (slots, cdiv(N, BLOCK_N)); x [S, K], experts [S], W [E, N, K]."""
    fp8_dynamic_expert_gemv_kernel(x, experts, weight, scale, y, N, K, BLOCK_N, EMULATE_E4M3)


__all__ = ["FP8_TILE", "fp8_expert_plugin_kernel", "conv_block_sizes", "fp8_plugin_kernel", "conv_plugin_kernel", "gdn_plugin_kernel", "recurrent_block_sizes"]
