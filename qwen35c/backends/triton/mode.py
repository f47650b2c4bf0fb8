"""Which way the kernels run: compiled on a CUDA GPU, or by Triton's CPU interpreter.

TRITON_INTERPRET is read when `@triton.jit` decorates a function: our kernels when their modules are
imported, and Triton's own library functions (`tl.sum`'s combine, ...) when `triton.language` is.
Without CUDA, `ensure()` sets it before Triton is imported and refuses (clearly) when Triton or a
kernel module was already imported in compiled mode; the backend's runtime modules (plan, emit,
session) call it at import, before they import triton.
"""

from __future__ import annotations

import os
import sys

from qwen35c.errors import QwenError

AOT_ENV = "QWEN35C_TRITON_AOT"
KERNEL_MODULES = (
    "qwen35c.backends.triton.gemm.dense", "qwen35c.backends.triton.gemm.fp8", "qwen35c.backends.triton.gemm.int4",
    "qwen35c.backends.triton.rmsnorm.kernel", "qwen35c.backends.triton.rope.kernel",
    "qwen35c.backends.triton.attention.kernel", "qwen35c.backends.triton.causal_conv1d.kernel",
    "qwen35c.backends.triton.gated_delta_rule.chunk", "qwen35c.backends.triton.gated_delta_rule.fused_recurrent",
    "qwen35c.backends.triton.moe.kernel", "qwen35c.backends.triton.moe.quantized",
    "qwen35c.backends.triton.elementwise.kernel", "qwen35c.backends.tensorrt.kernels",
)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def ensure() -> str:
    """'interpreter' or 'cuda'; sets TRITON_INTERPRET=1 on a machine without CUDA. 'aot' in the
    kernel-shipping child process (AOT_ENV set): kernels compiled for a GPU target, nothing run."""
    if os.environ.get(AOT_ENV) == "1":
        return "aot"
    if cuda_available() and not interpreting():
        return "cuda"
    if not interpreting():
        compiled = [m for m in ("triton.language", *KERNEL_MODULES) if m in sys.modules]
        if compiled:
            raise QwenError(f"triton backend: no CUDA GPU, and {compiled[-1]} was already imported in compiled "
                            f"mode; set TRITON_INTERPRET=1 before Triton is imported (or run in a new process)")
        os.environ["TRITON_INTERPRET"] = "1"
    return "interpreter"


__all__ = ["KERNEL_MODULES", "cuda_available", "ensure", "interpreting"]
