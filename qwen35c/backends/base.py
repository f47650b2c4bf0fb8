"""The backend interface: what `build`, `verify` and `runtime.load` call, nothing more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:   # annotations only: loading an onnx artifact imports neither torch nor the IR
    import torch

    from qwen35c.graph.ir import Graph
    from qwen35c.runtime.session import Session


@dataclass
class EmitContext:
    """What a backend gets besides the graph: `weights(name)` answers every weight the graph names
    (packed `name#part` tensors included for quantized graphs), `release(name)` says a weight will
    not be asked again, `on_weight(name)` reports progress; `quantization` is the build's record."""

    weights: Callable[[str], torch.Tensor]
    release: Callable[[str], None]
    on_weight: Callable[[str], None]
    tied_lm_head: bool
    target: Any                      # qwen35c.targets.Target
    quantization: dict | None = None
    mtp: Graph | None = None         # the MTP head's stateful graph, for a backend with `drafts = True`


class Backend(Protocol):
    name: str
    drafts: bool                     # compiles a checkpoint's MTP head (EmitContext.mtp) for speculative decoding

    def setup(self) -> None:
        """Process-wide preparation, called before tracing (which may import Triton through torch):
        the triton backend picks compiled or interpreter mode before Triton is first imported."""

    def emit(self, graph: Graph, out_dir: Path, ctx: EmitContext) -> dict:
        """Write the payload into `out_dir`; return the manifest's `backend` section (with `name`)."""

    def validate(self, section: dict, check: Any, files: dict) -> None:
        """Raise (through `check`, an `artifact.ManifestChecker`) on a mistyped key of `section` or a path
        the runtime would open that is not in `files`."""

    def load(self, directory: Path, manifest: dict, threads: int | None = None, lean: bool = False,
             drafting: bool = False) -> Session:
        """A session over a checked artifact; `lean` for a parity check (build, verify): memory
        before speed where the runtime offers the choice (the numbers are the same). `drafting`:
        the model joined with its MTP head (speculative decoding with `drafter="mtp"`), where the
        backend compiles one."""

    def engine_status(self, section: dict) -> dict:
        """The manifest's `engine` section for a freshly emitted payload."""

    def reference(self, model_dir: Path, manifest: dict, prepared: Any, mode: str | None) -> tuple[Session, str, str]:
        """What the artifact, run in `mode` (its session's `mode`), must match: (reference session,
        gate name in `qwen35c.targets.GATES`, a description). `prepared` is the build's or verify's
        `qwen35c.quant.build.Prepared` for a quantized artifact (None otherwise); not modified."""
