"""The triton backend's emitter: plan, packed weights and (optionally) compiled kernels into out_dir.

    emit_triton(graph, weights, out_dir, target, *, on_weight=None, release=None, tied_lm_head=False,
                ship_kernels=None) -> TritonEmitResult

`graph` is the stateful IR after `triton_pipeline(quantize)`; `weights(name)` answers every weight
name of the graph (`<name>#<part>` for the quantize pass's packed parts). Files written:

  plan.json              the execution plan (qwen35c.backends.triton.plan.Plan.to_json)
  plan.txt               its text form (diffable)
  weights.safetensors    the packed weights (pack.py)
  kernels/               with ship_kernels: cubin + PTX + metadata of every specialisation the plan
                         launches, compiled for target.sm (kernels.py); listed with sha256 in the
                         backend dict together with the Triton version

`emulating_reference(model_dir, record=None)` is the reference this artifact is compared with: the
fp32 reference model with every weight the plan stores in bf16 rounded to bf16 (A_log and dt_bias stay
fp32); with `record` (the graph's quantization record) the quantization-emulating model
(`qwen35c.quant.build.prepare(...)`, plus the routed experts the pack quantizes, experts.py) over
those rounded weights.
"""

from __future__ import annotations

from qwen35c.backends.triton import mode as _mode

_mode.ensure()   # before triton is imported (see mode.py)

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qwen35c.backends.triton.plan import PLAN_FORMAT, TRITON_PIPELINE, lower
from qwen35c.errors import QwenError

PLAN_FILE, PLAN_TEXT_FILE = "plan.json", "plan.txt"
FP32_WEIGHTS = ("A_log", "dt_bias")      # kept fp32 by the plan (the GDN gate parameters)


def triton_pipeline(quantize: str | None = None) -> str:
    """The pipeline text a triton target uses; `quantize` is the quantize pass options
    ("scheme=fp8-block128", "scheme=int4-gptq group-size=128") or None."""
    if quantize is not None and not quantize.startswith("scheme="):
        quantize = "scheme=" + quantize
    return TRITON_PIPELINE.format(quantize=f"quantize{{{quantize}}}," if quantize else "")


@dataclass
class TritonEmitResult:
    files: list[Path]
    backend: dict                       # the manifest's `backend` section
    plan: object = None
    notes: list[str] = field(default_factory=list)


def emit_triton(graph, weights: Callable, out_dir, target, *, on_weight=None, release=None,
                tied_lm_head: bool = False, ship_kernels: bool | None = None) -> TritonEmitResult:
    from qwen35c.backends.triton.pack import WEIGHTS_FILE, pack_weights

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = lower(graph)
    (out_dir / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=1, sort_keys=True) + "\n")
    (out_dir / PLAN_TEXT_FILE).write_text(plan.text())
    pack_weights(plan, weights, out_dir, on_weight=on_weight, release=release)
    files = [out_dir / PLAN_FILE, out_dir / PLAN_TEXT_FILE, out_dir / WEIGHTS_FILE]
    sm = getattr(target, "sm", None)
    backend = {
        "name": "triton", "plan": PLAN_FILE, "plan_text": PLAN_TEXT_FILE, "plan_format": PLAN_FORMAT,
        "weights": WEIGHTS_FILE, "sm": sm, "tied_lm_head": bool(tied_lm_head),
        "states": plan.states, "host_ops": sorted({s.op for steps in plan.programs.values() for s in steps
                                                    if not hasattr(s, "kernel")}),
        "launches": {k: len([s for s in v if hasattr(s, "kernel")]) for k, v in plan.programs.items()},
        "specialisations": sorted(plan.specialisations()),
        "activations": {"cpu": "fp32 (Triton interpreter)", "cuda": "bf16"},
        "notes": plan.notes,
        "kernels": None,
    }
    if ship_kernels if ship_kernels is not None else sm is not None:
        if sm is None:
            raise QwenError(f"target {getattr(target, 'name', target)!r} has no SM: no kernels to ship")
        from qwen35c.backends.triton.kernels import ship

        backend["kernels"] = ship(plan, sm, out_dir)
        files += [out_dir / k["file"] for k in backend["kernels"]["files"]]
    return TritonEmitResult(files, backend, plan, plan.notes)


def bf16_weight(name: str) -> bool:
    return not name.endswith(FP32_WEIGHTS)


def emulating_reference(model_dir, record: dict | None = None):
    """The qwen35c ReferenceSession a triton artifact is compared with (see the module docstring)."""
    import torch

    from qwen35c.runtime.session import ReferenceSession, load_tokenizer
    from reference.checkpoint import load_model

    model_dir = Path(model_dir)
    if record is None:
        model = load_model(model_dir, torch.float32)
        _round_bf16(model)
        return ReferenceSession(model, load_tokenizer(model_dir), model_dir)
    from qwen35c.backends.triton.experts import expert_format, quantize_stacked, why_not
    from qwen35c.quant.build import prepare
    from qwen35c.quant.model import emulate

    prepared = prepare(model_dir, record)                 # quantizes from the unrounded weights
    model = load_model(model_dir, torch.float32)          # resident: the rounding below needs the weights
    fmt = expert_format(record.get("recipe"))
    params = {_canonical(n): p for n, p in model.named_parameters()}
    for stacked in record.get("not_lowered", []):         # the routed experts the pack quantizes
        if not stacked.endswith("experts.gate_up_proj"):
            continue
        block = stacked[: -len(".experts.gate_up_proj")]
        w13, w2 = params[stacked], params[block + ".experts.down_proj"]
        if why_not(fmt, w13.shape[2], w2.shape[2]) is not None:
            continue
        for w, which in ((w13, "gate_up"), (w2, "down")):
            for (e, proj), q in quantize_stacked(w.detach(), fmt, which)[1].items():
                prepared.quantized.weights[f"{block}.experts.{e}.{proj}.weight"] = q
    _round_bf16(model)                                     # what the pack stores in bf16
    return ReferenceSession(emulate(model, prepared.quantized), load_tokenizer(model_dir), model_dir)


def _round_bf16(model) -> None:
    """Round every weight the plan stores in bf16; emulate() then replaces the quantized ones."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if bf16_weight(name):
                param.copy_(param.to(torch.bfloat16).float())


def _canonical(name: str) -> str:
    from qwen35c.quant.policy import canonical_name

    return canonical_name(name)


def build_directory(model_dir, target_name: str, out_dir, *, quantize: str | None = None,
                    ship_kernels: bool = False) -> dict:
    """Trace, run the triton pipeline, pack and emit into out_dir with a minimal manifest.json (the
    `backend`, `target` and `quantization` sections): what tests and the GPU bench load with
    TritonSession until build_artifact calls emit_triton. Returns the manifest."""
    import shutil

    from qwen35c.graph.trace import CheckpointWeights, trace_checkpoint
    from qwen35c.passes.manager import PassManager
    from qwen35c.targets import get_target

    target = get_target(target_name)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if quantize is None and target.quantize:
        quantize = target.quantize
    graph = PassManager(triton_pipeline(quantize)).run(trace_checkpoint(model_dir).graph).graph
    weights = CheckpointWeights(model_dir)
    source, record = weights, None
    if graph.metadata.get("quantization") is not None:
        from qwen35c.passes.quantize import quantized_weight_source
        from qwen35c.quant.build import prepare
        from qwen35c.quant.recipe import Recipe

        prepared = prepare(model_dir, graph.metadata["quantization"])
        record = prepared.record
        source = quantized_weight_source(weights, Recipe.from_dict(record["recipe"]), prepared.quantized)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = emit_triton(graph, source, out_dir, target, ship_kernels=ship_kernels,
                         tied_lm_head=bool(weights.config.tie_word_embeddings))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    manifest = {"backend": result.backend, "target": target.to_json(), "pipeline": triton_pipeline(quantize),
                "quantization": record, "source": {"path": str(model_dir)}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


__all__ = ["TritonEmitResult", "build_directory", "emit_triton", "emulating_reference", "triton_pipeline"]
