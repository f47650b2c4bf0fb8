"""The checkpoints bundled with qwen35c, and how a command finds the model it should use.

Two small Qwen3.5-architecture models, really trained (by `tools/train_tiny.py`) on the Python
standard library, ship inside the package so that every command that takes a model works on a
fresh install without downloading anything:

* `qwen35-tiny`      dense: 8 layers (6 Gated DeltaNet + 2 gated attention), hidden 256
* `qwen35-tiny-moe`  same trunk, 8 routed experts (top-2) plus the gated shared expert

Each directory holds config.json (official nested schema), model.safetensors (bf16, official
names), tokenizer.json and a README.md model card.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from qwen35c.errors import QwenError

DEFAULT_MODEL = "qwen35-tiny"
BUNDLED = ("qwen35-tiny", "qwen35-tiny-moe")

__all__ = ["BUNDLED", "DEFAULT_MODEL", "ModelRef", "bundled", "default_model_path", "resolve_model",
           "resolve_model_or_preset"]


def bundled(name: str) -> Path:
    """Directory of the bundled checkpoint `name` (one of `BUNDLED`)."""
    if name not in BUNDLED:
        raise QwenError(f"{name}: not a bundled model (bundled: {', '.join(BUNDLED)})")
    ref = resources.files(__name__) / name
    path = Path(str(ref))
    if not (path / "config.json").is_file():
        raise QwenError(f"{path}: bundled model '{name}' is missing from this install "
                        f"(no config.json); reinstall qwen35c")
    return path


def default_model_path() -> Path:
    """Directory of the model every command uses when none is given (the dense tiny model)."""
    return bundled(DEFAULT_MODEL)


def resolve_model(model: str | Path | None) -> Path:
    """A command's MODEL argument as a path: None -> the default bundled model; a bundled name
    (that is not also an existing path) -> that bundled model; anything else -> the path itself."""
    if model is None or str(model) == "":
        return default_model_path()
    path = Path(model)
    if not path.exists() and str(model) in BUNDLED:
        return bundled(str(model))
    return path


class ModelRef:
    """What a command's MODEL names: a checkpoint directory (`path`) or a random-weights preset."""

    def __init__(self, path: Path | None, preset: str | None):
        self.path, self.preset = path, preset

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else f"preset {self.preset}"

    def config(self):
        from reference.checkpoint import preset_config
        from reference.config import load_config

        return load_config(self.path) if self.path is not None else preset_config(self.preset)


def resolve_model_or_preset(model: str | Path | None) -> ModelRef:
    """`resolve_model` for the commands that also take a preset name (tiny, 0.8b, ...: a config with
    seeded random weights): an existing path wins, then a bundled name, then a preset."""
    from reference.checkpoint import PRESETS

    if model is not None and not Path(model).exists() and str(model) not in BUNDLED:
        if str(model) in PRESETS:
            return ModelRef(None, str(model))
        raise QwenError(f"{model}: not a checkpoint directory, a bundled model ({', '.join(BUNDLED)}) "
                        f"or a preset ({', '.join(PRESETS)})")
    path = resolve_model(model)
    if not path.is_dir():
        raise QwenError(f"{path}: not a checkpoint directory")
    return ModelRef(path, None)
