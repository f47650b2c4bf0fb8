"""`qwen35c export`: a checkpoint or artifact in the format a serving stack loads.

Formats (`FORMATS`):
  hf-fp8    a Hugging Face checkpoint of MODEL in the official Qwen FP8 layout (block-128 E4M3
            `weight` + fp32 `weight_scale_inv`, `quantization_config.quant_method = "fp8"`): what
            vLLM, SGLang and TensorRT-LLM load for FP8. Data-free: one tensor resident at a time.
  hf-gptq   the same with GPTQ INT4 tensors (`qweight` / `qzeros` / `scales` / `g_idx`,
            `checkpoint_format: gptq_v2`), quantized with a GPTQ recipe (calibrated, layer by layer).
  hf-awq    AutoAWQ's GEMM layout (`version: gemm`, zero points). AutoAWQ folds its activation scales
            into the previous op; qwen35c's `int4-awq` keeps them explicit (`Int4Weight.pre_scale`),
            which the format cannot hold, so hf-awq is written from an RTN or GPTQ recipe (default
            `int4-rtn symmetric=false`) and refuses `int4-awq`.
            The hf-* codes are exactly the ones a qwen35c build of the same recipe packs
            (`quant.build.prepare`, layer by layer; the packed INT4 codes of the whole model, 1/8 of its
            fp32 bytes, are held until written) and import back bit for bit (`quant.checkpoint.import_quantized`).
  genai     an ONNX Runtime GenAI model folder for an `onnx` artifact: the artifact's graph adapted to
            GenAI's conventions (`backends/onnx/genai.py`; its weights file byte for byte),
            `genai_config.json`, the tokenizer files. Pinned to onnxruntime-genai 0.18.0.
  triton-server  a Triton Inference Server model repository entry. For a `triton` (GPU runtime)
            artifact: the Python backend (`NAME/1/model.py` = `qwen35c/triton_server_model.py`, the
            artifact hash-checked into `NAME/1/artifact/`, sequence batching with START / END /
            CORRID controls, logits of each request's last token). For an `onnx` artifact (`cpu`,
            `cpu-int4`): `NAME/config.pbtxt` (platform `onnxruntime_onnx`) and `NAME/1/` holding the
            artifact's hash-checked model.onnx and its data. Sequence batching, direct strategy: each
            batch slot is one sequence, and the conv / recurrent states and the KV cache are implicit
            state (zero initial state; the KV cache sized for `max_length` positions). The client
            sends `input_ids [T]`, `q_start` (tokens already in the sequence), `lengths` (T) and
            `logit_positions [P]` per request, with the sequence's correlation id and start flag.

Every export is written like an artifact (`artifact.atomic_directory`: a temporary sibling under a lock,
renamed into place; `--force` replaces only an empty directory or an earlier qwen35c export). Its
`qwen35c-export.json` records the format, the source's file hashes, the recipe with its calibration
record and the sha256 and size of every file; `is_export` is what `--force` checks before replacing.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen35c.errors import QwenError

EXPORT_MANIFEST = "qwen35c-export.json"
# format -> (checkpoint writer's name, default recipe)
FORMATS = {
    "hf-fp8": ("hf-fp8", "fp8-block128"),
    "hf-gptq": ("gptq", "int4-gptq group-size=128"),
    "hf-awq": ("awq", "int4-rtn group-size=128 symmetric=false"),
    "triton-server": (None, None),
    "genai": (None, None),
}
TRITON_DTYPES = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "bf16": "TYPE_BF16", "i64": "TYPE_INT64"}


def is_export(directory: Path) -> bool:
    """True for a directory holding a readable export manifest and exactly the files it lists (not hashed)."""
    from qwen35c.artifact import _walk

    try:
        file = directory / EXPORT_MANIFEST
        if file.is_symlink() or not file.is_file() or file.stat().st_size > 64 << 20:
            return False
        manifest = json.loads(file.read_text())
        return (isinstance(manifest, dict) and manifest.get("format") in FORMATS
                and isinstance(manifest.get("files"), dict)
                and set(_walk(directory)) == set(manifest["files"]) | {EXPORT_MANIFEST})
    except (OSError, ValueError, QwenError):
        return False


OUTPUT = (is_export, "a qwen35c export (a valid qwen35c-export.json and only the files it lists)")


def recipe_of(fmt: str, quantize: str | None):
    """The recipe of an export: `quantize` ("SCHEME [option=value ...]") or the format's default."""
    from qwen35c.passes.manager import parse_pipeline

    text = quantize or FORMATS[fmt][1]
    if not text.startswith("scheme="):
        text = "scheme=" + text
    recipe = parse_pipeline(f"quantize{{{text}}}")[0].options.recipe()
    if fmt == "hf-fp8" and (recipe.scheme != "fp8-block128" or recipe.activations != "dynamic"):
        raise QwenError(f"--format hf-fp8 is the official block-128 FP8 layout with dynamic activations; "
                        f"--quantize '{quantize}' is {recipe.label}")
    if fmt != "hf-fp8" and not recipe.is_int4:
        raise QwenError(f"--format {fmt} holds INT4 weights; --quantize '{quantize}' is {recipe.label}")
    if fmt != "hf-fp8" and recipe.activations != "none":
        raise QwenError(f"--format {fmt} has no activation quantization; drop activations={recipe.activations}")
    if fmt == "hf-awq" and recipe.algorithm == "awq":
        raise QwenError("--format hf-awq cannot hold qwen35c's int4-awq: its activation scales are explicit "
                        "(AutoAWQ folds them into the previous op); use int4-rtn or int4-gptq, or --format hf-gptq")
    if fmt == "hf-gptq" and recipe.algorithm == "awq":
        raise QwenError("--format hf-gptq has no input scale for int4-awq's explicit activation scales; "
                        "use int4-gptq or int4-rtn")
    if fmt == "hf-awq" and recipe.act_order and not recipe.static_groups:
        raise QwenError("--format hf-awq has no g_idx: GPTQ act-order needs static-groups=true")
    if fmt != "hf-fp8" and recipe.head_bits != 4:
        raise QwenError(f"--format {fmt} holds 4-bit codes only; drop head-bits={recipe.head_bits}")
    if fmt != "hf-fp8" and recipe.scales == "mse":
        raise QwenError(f"--format {fmt} is written with amax scales (signed mse scales are unchecked against the "
                        f"serving stacks' kernels); drop scales=mse")
    if fmt != "hf-fp8" and recipe.expert_groups != "fixed":
        raise QwenError(f"--format {fmt} has one group size for every linear; drop expert-groups={recipe.expert_groups}")
    return recipe


def export_checkpoint(model: Path, fmt: str, out: Path, *, quantize: str | None = None, force: bool = False,
                      shard_bytes: int = 4 << 30, say=lambda message: None) -> dict:
    """Write checkpoint `model` in `fmt` (an `hf-*` format) to `out`; returns the export manifest."""
    from qwen35c.artifact import atomic_directory, file_table, protected_paths, source_hashes, tool_versions
    from qwen35c.quant.checkpoint import _read_source, write_quantized_files
    from qwen35c.quant.policy import plan

    writer = FORMATS.get(fmt, (None,))[0]
    if writer is None:
        raise QwenError(f"'{fmt}' is not a checkpoint format (known: {', '.join(f for f in FORMATS if FORMATS[f][0])})")
    recipe = recipe_of(fmt, quantize)
    model, protected = Path(model), protected_paths(Path(model))
    with atomic_directory(out, force, protected, OUTPUT) as tmp:
        record = {"recipe": recipe.to_dict(), "label": recipe.label}
        quantized = None
        if recipe.is_int4:
            from qwen35c.quant.build import prepare

            ckpt, _ = _read_source(model)
            try:
                shapes = {n: tuple(ckpt.files[ckpt.location[n]].shape(n)) for n in ckpt.names()}
            finally:
                ckpt.close()
            names = sorted(d.canonical for d in plan(sorted(shapes.items()), recipe) if d.quantize)
            if not names:
                raise QwenError(f"{model}: {recipe.label} selects no linear of this model (nothing to quantize)")
            say(f"quantizing {len(names)} linears ({recipe.label}), layer by layer")
            prepared = prepare(model, {"recipe": recipe.to_dict(), "quantized": names})
            quantized, record = prepared.quantized, prepared.record
        say(f"writing the {fmt} checkpoint")
        write_quantized_files(model, tmp, recipe, writer, quantized, shard_bytes=shard_bytes)
        manifest = {"schema_version": 1, "format": fmt, "versions": tool_versions(),
                    "source": {"path": str(model), "files": source_hashes(model)},
                    "quantization": record, "files": file_table(tmp)}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _pbtxt_dims(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def triton_config(name: str, backend_section: dict, vocab: int, max_batch_size: int, max_length: int,
                  platform: str = "onnxruntime_onnx", kind: str = "KIND_CPU") -> str:
    """config.pbtxt of an onnx artifact's graph (its `interface` and `states`, see module docstring), or
    of the TensorRT engine of a tensorrt bundle (`platform` tensorrt_plan, KIND_GPU: the same interface).
    Outputs besides logits (`hidden` f32[B,T,H] of an artifact with an MTP head) are declared too."""
    extras = []      # "hidden f32[B,T,256]" -> ("hidden", [-1, 256]): batch dim implicit, T variable
    for entry in backend_section["interface"]["outputs"]:
        name, _, shape = entry.partition(" ")
        if name not in ("logits", "<state>.out"):
            dims = shape[shape.index("[") + 1:-1].split(",")[1:]
            extras.append((name, [int(d) if d.isdigit() else -1 for d in dims]))
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}",
             "input [",
             '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },',
             '  { name: "q_start" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },',
             '  { name: "lengths" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },',
             '  { name: "logit_positions" data_type: TYPE_INT64 dims: [ -1 ] }',
             "]",
             "output [",
             f'  {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {vocab} ] }}{"," if extras else ""}',
             *[f'  {{ name: "{n}" data_type: TYPE_FP32 dims: {_pbtxt_dims(d)} }}{"," if i + 1 < len(extras) else ""}'
               for i, (n, d) in enumerate(extras)],
             "]",
             "sequence_batching {",
             "  max_sequence_idle_microseconds: 600000000",
             "  direct { }",
             "  state ["]
    states = backend_section["states"]
    for i, spec in enumerate(states):
        if spec["shape"][0] != "B" or spec["dtype"] not in TRITON_DTYPES:
            raise QwenError(f"state '{spec['name']}': shape {spec['shape']} / dtype {spec['dtype']} has no "
                            f"Triton implicit-state form (batch first, {', '.join(TRITON_DTYPES)})")
        dims = [max_length if d == "S" else d for d in spec["shape"][1:]]
        if not all(isinstance(d, int) for d in dims):
            raise QwenError(f"state '{spec['name']}': dimension in {spec['shape']} other than B and S")
        dtype = TRITON_DTYPES[spec["dtype"]]
        lines += [f'    {{ input_name: "{spec["name"]}" output_name: "{spec["output"]}" data_type: {dtype} '
                  f"dims: {_pbtxt_dims(dims)}",
                  f'      initial_state: {{ name: "zero" data_type: {dtype} dims: {_pbtxt_dims(dims)} zero_data: true }}'
                  f" }}{',' if i + 1 < len(states) else ''}"]
    lines += ["  ]", "}", f"instance_group [ {{ kind: {kind} count: 1 }} ]"]
    return "\n".join(lines) + "\n"


def _artifact(artifact: Path, fmt: str, backends: tuple[str, ...]) -> tuple[dict, dict]:
    """The manifest and config.json of a hash-checked artifact of one of `backends`."""
    from qwen35c.runtime import is_artifact_dir, open_checked

    if not is_artifact_dir(artifact):
        raise QwenError(f"{artifact}: --format {fmt} exports a built artifact (a directory with manifest.json)")
    manifest, _ = open_checked(artifact)            # every file's size and sha256, before anything is read
    if manifest["backend"]["name"] not in backends:
        raise QwenError(f"{artifact}: a '{manifest['backend']['name']}' artifact; --format {fmt} takes "
                        f"{' or '.join(backends)} artifacts")
    if "config.json" not in manifest["files"]:
        raise QwenError(f"{artifact}: no config.json in the artifact")
    return manifest, json.loads((artifact / "config.json").read_text())


def _copy_checked(artifact: Path, manifest: dict, rel: str, dest: Path) -> None:
    import shutil

    from qwen35c.artifact import sha256_file

    shutil.copyfile(artifact / rel, dest)
    if sha256_file(dest) != manifest["files"][rel]["sha256"]:
        raise QwenError(f"{artifact / rel}: changed while it was copied")


def _export_manifest(fmt: str, artifact: Path, manifest: dict, tmp: Path, **extra) -> dict:
    from qwen35c.artifact import file_table, sha256_file, tool_versions

    export = {"schema_version": 1, "format": fmt, "versions": tool_versions(), **extra,
              "source": {"path": str(artifact), "manifest_sha256": sha256_file(artifact / "manifest.json"),
                         "target": manifest["target"]["name"]},
              "quantization": manifest.get("quantization"), "files": file_table(tmp)}
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(export, indent=2, sort_keys=True) + "\n")
    return export


def export_genai(artifact: Path, out: Path, *, max_length: int | None = None, force: bool = False,
                 say=lambda message: None) -> dict:
    """An ONNX Runtime GenAI model folder of onnx artifact `artifact` (see the module docstring)."""
    from qwen35c.artifact import atomic_directory, protected_paths
    from qwen35c.backends.onnx.genai import GENAI_VERSION, adapt, genai_model_type

    artifact = Path(artifact)
    manifest, config = _artifact(artifact, "genai", ("onnx",))
    text = config.get("text_config", config)
    kind = genai_model_type(config)
    section = manifest["backend"]
    context = int(text.get("max_position_embeddings", 4096))
    max_length = max_length or min(context, 4096)
    if not 1 <= max_length <= context:
        raise QwenError(f"--max-length {max_length}: 1..{context} (the model's max_position_embeddings)")
    with atomic_directory(out, force, protected_paths(artifact), OUTPUT) as tmp:
        _copy_checked(artifact, manifest, section["data"], tmp / section["data"])
        names = adapt(artifact / section["model"], section["states"], tmp / "model.onnx")
        for rel in ("tokenizer.json", "tokenizer_config.json"):
            if rel in manifest["files"]:
                _copy_checked(artifact, manifest, rel, tmp / rel)
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        pad = text.get("pad_token_id", config.get("pad_token_id"))
        genai_config = {
            "model": {
                "bos_token_id": text.get("bos_token_id") or 1,
                "context_length": context,
                "decoder": {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                            "filename": "model.onnx", "head_size": text["head_dim"],
                            "hidden_size": text["hidden_size"], "inputs": names["inputs"], "outputs": names["outputs"],
                            "num_attention_heads": text["num_attention_heads"],
                            "num_hidden_layers": text["num_hidden_layers"],
                            "num_key_value_heads": text["num_key_value_heads"]},
                "eos_token_id": eos, "pad_token_id": pad if pad is not None else eos,
                "type": kind, "vocab_size": text["vocab_size"]},
            "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                       "max_length": max_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                       "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                       "temperature": 1.0, "top_k": 1, "top_p": 1.0}}
        (tmp / "genai_config.json").write_text(json.dumps(genai_config, indent=2) + "\n")
        say(f"wrote an ONNX Runtime GenAI {GENAI_VERSION} model ({kind}, {len(section['states'])} states)")
        return _export_manifest("genai", artifact, manifest, tmp, onnxruntime_genai=GENAI_VERSION)


def python_backend_config(name: str, max_batch_size: int, max_length: int, gpu: bool) -> str:
    """config.pbtxt of a Python-backend entry over a triton artifact (see `qwen35c.triton_server_model`)."""
    control = ("    {{ name: \"{0}\" control [ {{ kind: CONTROL_SEQUENCE_{1} {2} }} ] }}")
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 1",   # one request per execute step
        "input [", '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }', "]",
        "output [", '  { name: "logits" data_type: TYPE_FP32 dims: [ -1 ] }', "]",
        "sequence_batching {", "  max_sequence_idle_microseconds: 600000000",
        f"  oldest {{ max_candidate_sequences: {max_batch_size} }}", "  control_input [",
        control.format("START", "START", "int32_false_true: [ 0, 1 ]") + ",",
        control.format("END", "END", "int32_false_true: [ 0, 1 ]") + ",",
        control.format("CORRID", "CORRID", "data_type: TYPE_UINT64"), "  ]", "}",
        'parameters { key: "artifact" value: { string_value: "artifact" } }',
        f'parameters {{ key: "max_length" value: {{ string_value: "{max_length}" }} }}',
        f"instance_group [ {{ kind: {'KIND_GPU' if gpu else 'KIND_CPU'} count: 1 }} ]"]) + "\n"


def export_triton_server(artifact: Path, out: Path, *, name: str | None = None, max_batch_size: int = 8,
                         max_length: int = 4096, force: bool = False, say=lambda message: None) -> dict:
    """A Triton Inference Server model repository holding artifact `artifact` as `name`: an onnx
    artifact on the ONNX Runtime backend, a triton artifact through the Python backend."""
    import re

    from qwen35c.artifact import MANIFEST, atomic_directory, protected_paths

    artifact = Path(artifact)
    manifest, config = _artifact(artifact, "triton-server", ("onnx", "triton"))
    section = manifest["backend"]
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(manifest["source"]["path"]).name) or "qwen35c"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise QwenError(f"--name '{name}': a Triton model name is letters, digits, '_', '.', '-'")
    if not 1 <= max_batch_size <= 1024 or not 1 <= max_length <= 1 << 20:
        raise QwenError(f"--max-batch-size {max_batch_size} / --max-length {max_length} out of range")
    vocab = config.get("text_config", config).get("vocab_size")
    if not isinstance(vocab, int):
        raise QwenError(f"{artifact}: no vocab_size in its config.json")
    with atomic_directory(out, force, protected_paths(artifact), OUTPUT) as tmp:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        if section["name"] == "onnx":
            text = triton_config(name, section, vocab, max_batch_size, max_length)
            for rel in (section["model"], section["data"]):
                _copy_checked(artifact, manifest, rel, version / Path(rel).name)
        else:
            import shutil

            text = python_backend_config(name, max_batch_size, max_length, gpu=manifest["target"]["sm"] is not None)
            for rel in manifest["files"]:
                (version / "artifact" / rel).parent.mkdir(parents=True, exist_ok=True)
                _copy_checked(artifact, manifest, rel, version / "artifact" / rel)
            shutil.copyfile(artifact / MANIFEST, version / "artifact" / MANIFEST)
            shutil.copyfile(Path(__file__).with_name("triton_server_model.py"), version / "model.py")
        (tmp / name / "config.pbtxt").write_text(text)
        say(f"wrote model repository entry '{name}' ({'onnxruntime_onnx' if section['name'] == 'onnx' else 'python'} "
            f"backend, {len(section.get('states', []))} states)")
        export = _export_manifest("triton-server", artifact, manifest, tmp, model_name=name)
    return export


__all__ = ["EXPORT_MANIFEST", "FORMATS", "export_checkpoint", "export_genai", "export_triton_server", "is_export", "recipe_of",
           "triton_config"]
