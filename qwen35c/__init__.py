"""qwen35c: a compiler-style export and optimisation toolchain for Qwen3.5 models."""

__version__ = "0.1.0"
