"""The onnx backend behind the interface of `qwen35c.backends.base`: emit, validate, load."""

from __future__ import annotations

import json
from pathlib import Path

from qwen35c.artifact import ArtifactError, artifact_file
from qwen35c.backends.base import EmitContext

_DTYPES = ("f32", "f16", "i64")
_INTERFACE = {"inputs": ["input_ids i64[B,T]", "q_start i64[B]", "lengths i64[B]", "logit_positions i64[B,P]",
                         "<states>"],
              "outputs": ["logits f32[B,P,V]", "<state>.out"]}
_COMMIT = "commit i64[B] (optional: defaults to lengths)"
_MAX_DIM = 1 << 24          # a static state dimension larger than this is not a Qwen3.5 state


def _graph_section(emitted) -> dict:
    """The manifest's description of one emitted graph (model.onnx, or mtp.onnx under `mtp`)."""
    inputs = _INTERFACE["inputs"][:4] + emitted.extra_inputs + _INTERFACE["inputs"][4:] + [_COMMIT] * emitted.commit
    outputs = _INTERFACE["outputs"][:1] + emitted.extra_outputs + _INTERFACE["outputs"][1:]
    return {"model": emitted.model_file.name, "data": emitted.data_file.name,
            "states": [s.to_json() for s in emitted.states], "ops": emitted.ops, "nodes": emitted.num_nodes,
            "interface": {"inputs": inputs, "outputs": outputs}}


def _validate_graph(section: dict, key: str, check, files: dict) -> None:
    check.listed(section.get("model"), f"{key}.model", files)
    check.listed(section.get("data"), f"{key}.data", files)
    check.int(section.get("nodes"), f"{key}.nodes")
    for op, count in check.dict(section.get("ops"), f"{key}.ops").items():
        check.int(count, f"{key}.ops[\"{op}\"]")
    interface = check.dict(section.get("interface"), f"{key}.interface")
    for side in ("inputs", "outputs"):
        for j, entry in enumerate(check.list(interface.get(side), f"{key}.interface.{side}")):
            check.str(entry, f"{key}.interface.{side}[{j}]")
    seen = set()
    for i, spec in enumerate(check.list(section.get("states"), f"{key}.states")):
        at = f"{key}.states[{i}]"
        check.dict(spec, at)
        for field in ("name", "output", "key", "layout"):
            check.str(spec.get(field), f"{at}.{field}")
        if spec["name"] in seen:
            raise check.fail(f"{at}.name", f"repeats '{spec['name']}'")
        seen.add(spec["name"])
        if spec.get("dtype") not in _DTYPES:
            raise check.fail(f"{at}.dtype", f"must be one of {', '.join(_DTYPES)}, got {spec.get('dtype')!r}")
        for j, dim in enumerate(check.list(spec.get("shape"), f"{at}.shape")):
            if dim not in ("B", "S"):
                check.int(dim, f"{at}.shape[{j}]", 1, _MAX_DIM)


class OnnxBackend:
    name = "onnx"
    drafts = True
    statistical_check_prompts = "full"     # the build's check at a statistical gate (build._check)

    def setup(self) -> None:
        pass

    def emit(self, graph, out_dir: Path, ctx: EmitContext) -> dict:
        from qwen35c.backends.onnx.emit import emit_onnx

        kwargs = dict(on_weight=ctx.on_weight, release=ctx.release, tied_lm_head=ctx.tied_lm_head)
        emitted = emit_onnx(graph, ctx.weights, out_dir, hidden_output=ctx.mtp is not None, **kwargs)
        section = {"name": self.name, **_graph_section(emitted), "opset": 23, "domains": ["", "com.microsoft"],
                   "min_onnxruntime": "1.32"}
        files = [emitted.model_file]
        if ctx.mtp is not None:   # the draft head: its own graph, reading the shared tensors from model.onnx.data
            mtp = emit_onnx(ctx.mtp, ctx.weights, out_dir, model_name="mtp.onnx", reuse=emitted.external, **kwargs)
            section["mtp"] = _graph_section(mtp)
            files.append(mtp.model_file)
        if ctx.quantization is not None:
            for file in files:
                _annotate(file, {"qwen35c.quantization": json.dumps(ctx.quantization, sort_keys=True)})
        return section

    def engine_status(self, section: dict) -> dict:
        return {"status": "ready", "detail": "ONNX Runtime (CPUExecutionProvider) loads the model at run time"}

    def validate(self, section: dict, check, files: dict) -> None:
        check.int(section.get("opset"), "backend.opset", 1, 99)
        _validate_graph(section, "backend", check, files)
        if section.get("mtp") is not None:
            _validate_graph(check.dict(section["mtp"], "backend.mtp"), "backend.mtp", check, files)

    def reference(self, model_dir: Path, manifest: dict, prepared, mode: str | None):
        """The fp32 reference at the target's gate, or for a quantized artifact the quantization-
        emulating reference at the recipe's lowering gate (ORT computes in fp32)."""
        import torch

        from qwen35c.runtime.session import ReferenceSession, load_tokenizer
        from qwen35c.targets import get_target, lowering_gate
        from reference.stream import StreamedModel

        if prepared is None:   # streamed: one decoder layer resident at a time, the same logits
            reference = ReferenceSession(StreamedModel(model_dir, torch.float32), load_tokenizer(model_dir), model_dir)
            return reference, get_target(manifest["target"]["name"]).precision, "reference"
        return ReferenceSession(prepared.emulated()), lowering_gate(prepared.record), "quantization-emulating reference"

    def load(self, directory: Path, manifest: dict, threads: int | None = None, lean: bool = False,
             drafting: bool = False):
        from qwen35c.backends.onnx.session import OnnxSession

        _check_model(directory, manifest)
        return OnnxSession(directory, manifest, threads=threads, arena=not lean, graph="drafting" if drafting else None)


def _check_model(directory: Path, manifest: dict) -> None:
    """model.onnx (and mtp.onnx) agree with the manifest: external data lives only in listed files,
    the state inputs are exactly the manifest's states (name, dtype, static dims), the other inputs
    the interface's, and the quantization record is the manifest's."""
    section = manifest["backend"]
    _check_graph(directory, manifest, section, "backend")
    if section.get("mtp") is not None:
        _check_graph(directory, manifest, section["mtp"], "backend.mtp")


def _check_graph(directory: Path, manifest: dict, section: dict, key: str) -> None:
    import onnx

    file = artifact_file(directory, manifest, section["model"])
    try:
        proto = onnx.load(str(file), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends
        raise ArtifactError(f"{file}: not a readable ONNX model ({err})") from None
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if location not in manifest["files"]:
                raise ArtifactError(f"{file}: initializer '{tensor.name}' reads external data from "
                                    f"'{location}', which is not a listed artifact file")
    elem = {onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.FLOAT16: "f16", onnx.TensorProto.INT64: "i64"}
    inputs = {}
    for value in proto.graph.input:
        t = value.type.tensor_type
        inputs[value.name] = (elem.get(t.elem_type, str(t.elem_type)),
                              [d.dim_param or d.dim_value for d in t.shape.dim])
    for i, spec in enumerate(section["states"]):
        got = inputs.get(spec["name"])
        if got is None:
            raise ArtifactError(f"{directory}/manifest.json: key '{key}.states[{i}]' names '{spec['name']}', "
                                f"which is not an input of {section['model']}")
        dtype, dims = got
        static = [d for d in spec["shape"] if not isinstance(d, str)]
        if dtype != spec["dtype"] or len(dims) != len(spec["shape"]) or \
                static != [d for d, s in zip(dims, spec["shape"]) if not isinstance(s, str)]:
            raise ArtifactError(f"{directory}/manifest.json: key '{key}.states[{i}]' ({spec['dtype']} "
                                f"{spec['shape']}) disagrees with {section['model']} ({dtype} {dims})")
    expected = {entry.split()[0] for entry in section["interface"]["inputs"] if not entry.startswith("<")}
    expected |= {s["name"] for s in section["states"]}
    for name in sorted(expected - set(inputs)):
        raise ArtifactError(f"{file}: has no input '{name}' (the manifest's interface needs it)")
    for name in sorted(set(inputs) - expected):
        raise ArtifactError(f"{file}: input '{name}' is not in the manifest's interface (states or ids)")
    recorded = {p.key: p.value for p in proto.metadata_props}.get("qwen35c.quantization")
    declared = manifest.get("quantization")
    if (recorded is None) != (declared is None) or (declared is not None and json.loads(recorded) != declared):
        raise ArtifactError(f"{directory}/manifest.json: key 'quantization' disagrees with the quantization "
                            f"record inside {section['model']}")


def _annotate(model_file: Path, props: dict[str, str]) -> None:
    """Add metadata_props to an emitted model.onnx (external data untouched; deterministic bytes)."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    for key, value in sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    model_file.write_bytes(proto.SerializeToString(deterministic=True))


BACKEND = OnnxBackend()
