"""Reference Qwen3.5 / Qwen3-Next text model in plain, eager PyTorch.

The ground truth that every qwen35c artifact is verified against. It is checked against Hugging
Face `transformers` (models/qwen3_5, qwen3_5_moe, qwen3_next) in the tests. This package imports
nothing from `qwen35c`.
"""

from reference.errors import CheckpointError

__all__ = ["CheckpointError"]
