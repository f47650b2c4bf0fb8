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


class OnnxBackend:
    name = "onnx"
    statistical_check_prompts = "full"     # the build's check at a statistical gate (build._check)

    def setup(self) -> None:
        pass

    def emit(self, graph, out_dir: Path, ctx: EmitContext) -> dict:
        from qwen35c.backends.onnx.emit import emit_onnx

        emitted = emit_onnx(graph, ctx.weights, out_dir, on_weight=ctx.on_weight, release=ctx.release,
                            tied_lm_head=ctx.tied_lm_head)
        if ctx.quantization is not None:
            _annotate(emitted.model_file, {"qwen35c.quantization": json.dumps(ctx.quantization, sort_keys=True)})
        return {"name": self.name, "model": emitted.model_file.name, "data": emitted.data_file.name,
                "opset": 23, "domains": ["", "com.microsoft"], "min_onnxruntime": "1.32",
                "states": [s.to_json() for s in emitted.states], "ops": emitted.ops,
                "nodes": emitted.num_nodes,
                "interface": {**_INTERFACE, "inputs": _INTERFACE["inputs"] + [_COMMIT] * emitted.commit}}

    def engine_status(self, section: dict) -> dict:
        return {"status": "ready", "detail": "ONNX Runtime (CPUExecutionProvider) loads the model at run time"}

    def validate(self, section: dict, check, files: dict) -> None:
        check.listed(section.get("model"), "backend.model", files)
        check.listed(section.get("data"), "backend.data", files)
        check.int(section.get("opset"), "backend.opset", 1, 99)
        check.int(section.get("nodes"), "backend.nodes")
        for op, count in check.dict(section.get("ops"), "backend.ops").items():
            check.int(count, f"backend.ops[\"{op}\"]")
        interface = check.dict(section.get("interface"), "backend.interface")
        for j, entry in enumerate(check.list(interface.get("inputs"), "backend.interface.inputs")):
            check.str(entry, f"backend.interface.inputs[{j}]")
        seen = set()
        for i, spec in enumerate(check.list(section.get("states"), "backend.states")):
            key = f"backend.states[{i}]"
            check.dict(spec, key)
            for field in ("name", "output", "key", "layout"):
                check.str(spec.get(field), f"{key}.{field}")
            if spec["name"] in seen:
                raise check.fail(f"{key}.name", f"repeats '{spec['name']}'")
            seen.add(spec["name"])
            if spec.get("dtype") not in _DTYPES:
                raise check.fail(f"{key}.dtype", f"must be one of {', '.join(_DTYPES)}, got {spec.get('dtype')!r}")
            for j, dim in enumerate(check.list(spec.get("shape"), f"{key}.shape")):
                if dim not in ("B", "S"):
                    check.int(dim, f"{key}.shape[{j}]", 1, _MAX_DIM)

    def reference(self, model_dir: Path, manifest: dict, prepared, session):
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

    def load(self, directory: Path, manifest: dict, threads: int | None = None, lean: bool = False):
        from qwen35c.backends.onnx.session import OnnxSession

        _check_model(directory, manifest)
        return OnnxSession(directory, manifest, threads=threads, arena=not lean)


def _check_model(directory: Path, manifest: dict) -> None:
    """model.onnx agrees with its manifest: its external data lives only in listed files, and its
    state inputs are exactly the manifest's states (name, dtype, static dims)."""
    import onnx

    section = manifest["backend"]
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
            raise ArtifactError(f"{directory}/manifest.json: key 'backend.states[{i}]' names '{spec['name']}', "
                                f"which is not an input of {section['model']}")
        dtype, dims = got
        static = [d for d in spec["shape"] if not isinstance(d, str)]
        if dtype != spec["dtype"] or len(dims) != len(spec["shape"]) or \
                static != [d for d, s in zip(dims, spec["shape"]) if not isinstance(s, str)]:
            raise ArtifactError(f"{directory}/manifest.json: key 'backend.states[{i}]' ({spec['dtype']} "
                                f"{spec['shape']}) disagrees with {section['model']} ({dtype} {dims})")
    expected = {"input_ids", "q_start", "lengths", "logit_positions"} | {s["name"] for s in section["states"]}
    if _COMMIT in section["interface"]["inputs"]:
        expected.add("commit")
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
