"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a function, so it is set here, before any test
module imports a kernel. Each test module also sets it at its top for standalone runs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
