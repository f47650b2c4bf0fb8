"""`qwen35c export`: Hugging Face checkpoints in the formats vLLM / SGLang / TensorRT-LLM load
(hf-fp8, hf-gptq, hf-awq), written like artifacts (atomic, hashed, --force only over our own)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qwen35c.artifact import sha256_file
from qwen35c.cli import main
from qwen35c.export import EXPORT_MANIFEST, export_checkpoint, is_export, recipe_of
from qwen35c.models import default_model_path
from qwen35c.quant.checkpoint import import_quantized
from qwen35c.quant.formats import fp8_quantize


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    for fmt in ("hf-fp8", "hf-gptq", "hf-awq"):
        code, out = cli("export", "--format", fmt, "-o", root / fmt)
        assert code == 0, out
    return root


@pytest.mark.parametrize("fmt", ["hf-fp8", "hf-gptq", "hf-awq"])
def test_an_export_is_hashed_and_imports_back_bit_for_bit(exports, fmt):
    out = exports / fmt
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert is_export(out) and manifest["format"] == fmt
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != EXPORT_MANIFEST)
    for rel, entry in manifest["files"].items():
        assert sha256_file(out / rel) == entry["sha256"] and (out / rel).stat().st_size == entry["size"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    back, qc = import_quantized(out)
    source = default_model_path()
    assert manifest["source"]["files"]["model.safetensors"] == sha256_file(source / "model.safetensors")
    if fmt == "hf-fp8":
        assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
        from reference.checkpoint import Checkpoint

        ckpt = Checkpoint(source)
        try:
            for name, q in back.weights.items():      # data-free: the codes of fp8_quantize, exactly
                stored = name.replace("model.", "model.language_model.", 1)
                want = fp8_quantize(ckpt.view(stored).float())
                assert torch.equal(q.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
                assert torch.equal(q.scale, want.scale), name
        finally:
            ckpt.close()
        return
    from qwen35c.quant.build import prepare

    prepared = prepare(source, {"recipe": manifest["quantization"]["recipe"],
                                "quantized": manifest["quantization"]["quantized"]})
    assert prepared.record["packed_sha256"] == manifest["quantization"]["packed_sha256"]   # same codes as a build's
    assert set(back.weights) == set(prepared.quantized.weights) and back.weights
    for name, q in prepared.quantized.weights.items():
        got = back.weights[name]
        assert torch.equal(got.codes(), q.codes()), name
        assert torch.equal(got.scales, q.scales.half().float()), name          # the formats store fp16 scales
    if fmt == "hf-gptq":
        assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2" and qc["lm_head"] is False
        assert sorted(qc["modules_in_block_to_quantize"]) == sorted(
            n.replace("model.", "model.language_model.", 1)[: -len(".weight")] for n in prepared.quantized.weights)
    else:
        assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["zero_point"] is True
        assert qc["lm_head"] is False and "lm_head" in qc["modules_to_not_convert"]


def test_transformers_loads_the_fp8_export_on_cpu(exports):
    """HF transformers dequantizes an FP8 checkpoint on a CPU (its GPTQ/AWQ loaders need optimum /
    gptqmodel and a GPU kernel: not installable here): the weights it builds are our codes x scales."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(exports / "hf-fp8", dtype=torch.float32)
    back, _ = import_quantized(exports / "hf-fp8")
    params = dict(model.named_parameters())
    checked = 0
    for name, q in back.weights.items():
        assert torch.equal(params[name], q.dequantize()), name            # text-only model: canonical names
        checked += 1
    assert checked == len(back.weights) > 0
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    for fmt, scheme, why in [("hf-awq", "int4-awq", "explicit"), ("hf-gptq", "int4-awq", "explicit"),
                             ("hf-fp8", "int4-rtn", "block-128"), ("hf-gptq", "fp8-block128", "INT4"),
                             ("hf-fp8", "fp8-tensor", "block-128"), ("hf-gptq", "int4-rtn activations=int8", "activation"),
                             ("hf-gptq", "int4-rtn expert-groups=fit", "one group size")]:
        code, out = cli("export", "--format", fmt, "--quantize", scheme, "-o", tmp_path / "x")
        assert code == 2 and why in out and "Traceback" not in out, (fmt, scheme, out)
        assert not (tmp_path / "x").exists()
    assert recipe_of("hf-awq", None).label == "int4-rtn-g128-asym"


def test_export_outputs_follow_the_artifact_rules(exports, tmp_path):
    out = tmp_path / "fp8"
    assert cli("export", "--format", "hf-fp8", "-o", out)[0] == 0
    code, text = cli("export", "--format", "hf-fp8", "-o", out)
    assert code == 2 and "--force" in text
    before = json.loads((out / EXPORT_MANIFEST).read_text())
    assert cli("export", "--format", "hf-fp8", "-o", out, "--force")[0] == 0      # an export of ours: replaced
    assert json.loads((out / EXPORT_MANIFEST).read_text())["files"] == before["files"]   # deterministic
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    code, text = cli("export", "--format", "hf-fp8", "-o", theirs, "--force")
    assert code == 2 and "neither empty nor a qwen35c export" in text
    assert (theirs / "notes.txt").read_text() == "keep me"
    (out / "extra.bin").write_bytes(b"x")          # no longer exactly what its manifest lists: not ours
    assert not is_export(out) and cli("export", "--format", "hf-fp8", "-o", out, "--force")[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8", "theirs"]    # no temporaries left


def test_a_large_export_is_sharded_with_an_index(tmp_path):
    manifest = export_checkpoint(default_model_path(), "hf-fp8", tmp_path / "sharded", shard_bytes=2 << 20)
    shards = sorted(f for f in manifest["files"] if f.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in manifest["files"]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    whole, _ = import_quantized(Path(tmp_path / "sharded"))
    assert whole.weights and all(torch.isfinite(q.dequantize()).all() for q in whole.weights.values())


# ---- triton-server ---------------------------------------------------------------------------------

class TritonSimulator:
    """What Triton's ONNX Runtime backend does with the entry, by the entry's own config: requests of
    one batch stacked along a new first dimension (`reshape` honoured), implicit states starting from
    their zero initial state and fed back from the outputs they name. Sequence-batching, direct strategy:
    a slot per sequence, in the order given."""

    def __init__(self, entry: Path):
        import onnxruntime as ort
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        self.config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        self.ort = ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        self.states: dict[int, dict[str, np.ndarray]] = {}

    def start(self, sequence: int) -> None:
        self.states[sequence] = {s.input_name: np.zeros(list(s.initial_state[0].dims), np.float32)
                                 for s in self.config.sequence_batching.state}

    def infer(self, requests: dict[int, dict[str, np.ndarray]]) -> dict[int, np.ndarray]:
        assert len(requests) <= self.config.max_batch_size
        order = list(requests)
        feeds = {}
        for spec in self.config.input:
            rows = [requests[s][spec.name].reshape(list(spec.reshape.shape) if spec.HasField("reshape")
                                                   else requests[s][spec.name].shape) for s in order]
            feeds[spec.name] = np.stack(rows)
        for state in self.config.sequence_batching.state:
            feeds[state.input_name] = np.stack([self.states[s][state.input_name] for s in order])
        names = [o.name for o in self.config.output] + [s.output_name for s in self.config.sequence_batching.state]
        outputs = dict(zip(names, self.ort.run(names, feeds)))
        for i, s in enumerate(order):
            for state in self.config.sequence_batching.state:
                self.states[s][state.input_name] = outputs[state.output_name][i]
        return {s: outputs["logits"][i] for i, s in enumerate(order)}


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    from qwen35c.build import build_artifact

    out = tmp_path_factory.mktemp("onnx") / "art"
    build_artifact(default_model_path(), "cpu", out, check=False)
    return out


def test_a_triton_server_entry_serves_what_qwen35c_runs(onnx_artifact, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    import onnx

    from qwen35c.runtime import load

    code, out = cli("export", onnx_artifact, "--format", "triton-server", "-o", tmp_path / "repo",
                    "--name", "tiny", "--max-length", "256")
    assert code == 0, out
    entry = tmp_path / "repo" / "tiny"
    assert is_export(tmp_path / "repo")
    server = TritonSimulator(entry)
    config = server.config
    assert config.platform == "onnxruntime_onnx" and config.sequence_batching.HasField("direct")
    graph = onnx.load(str(entry / "1" / "model.onnx"), load_external_data=False).graph
    # an input with an initializer (commit, for speculative steps) is optional: ORT, and with it
    # Triton's onnxruntime backend, does not list it among the inputs a request must carry
    defaults = {t.name for t in graph.initializer}
    types = {v.name: v.type.tensor_type for v in [*graph.input, *graph.output] if v.name not in defaults}
    kinds = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_INT64": onnx.TensorProto.INT64}
    from tritonclient.grpc import model_config_pb2

    declared = [(i.name, i.data_type, i.dims) for i in [*config.input, *config.output]]
    declared += [(n, s.data_type, s.dims) for s in config.sequence_batching.state for n in (s.input_name, s.output_name)]
    assert {n for n, _, _ in declared} == set(types)                     # every graph input and output, no other
    for name, dtype, dims in declared:
        assert types[name].elem_type == kinds[model_config_pb2.DataType.Name(dtype)], name
        graph_dims = [d.dim_value or -1 for d in types[name].shape.dim][1:]
        assert all(g == -1 or g == d for g, d in zip(graph_dims, dims)), name

    session = load(onnx_artifact)
    prompts = [[5, 17, 300, 42, 9, 11, 12], list(range(70, 140))]      # the second crosses the 64-token chunk
    want = session.generate(prompts, 12).tokens
    for s, prompt in enumerate(prompts):                                 # each sequence's prefill alone
        server.start(s)
        logits = server.infer({s: {"input_ids": np.array(prompt), "q_start": np.array([0]),
                                   "lengths": np.array([len(prompt)]),
                                   "logit_positions": np.array([len(prompt) - 1])}})[s]
        server.states[s]["next"] = int(logits[-1].argmax())
    got = {s: [server.states[s].pop("next")] for s in range(len(prompts))}
    for step in range(11):                                               # decode: both sequences in one batch
        requests = {s: {"input_ids": np.array([got[s][-1]]), "q_start": np.array([len(prompts[s]) + step]),
                        "lengths": np.array([1]), "logit_positions": np.array([0])} for s in got}
        for s, logits in server.infer(requests).items():
            got[s].append(int(logits[-1].argmax()))
    assert [got[s] for s in range(len(prompts))] == want


def test_triton_server_refuses_what_it_cannot_serve(tmp_path, onnx_artifact):
    code, out = cli("export", default_model_path(), "--format", "triton-server", "-o", tmp_path / "r")
    assert code == 2 and "built artifact" in out
    code, out = cli("export", onnx_artifact, "--format", "triton-server", "-o", tmp_path / "r", "--name", "../x")
    assert code == 2 and "model name" in out and not (tmp_path / "r").exists()
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(onnx_artifact, tampered)
    with open(tampered / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    code, out = cli("export", tampered, "--format", "triton-server", "-o", tmp_path / "r")
    assert code == 2 and "model.onnx.data" in out and not (tmp_path / "r").exists()


# ---- genai ----------------------------------------------------------------------------------------

GENAI_PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n", "x = 1\ny = 2\nprint(x +",
                 "class Stack:\n    def push(self, item):"]


def _genai_greedy(folder: Path, prompt_ids: list[int], new: int):
    """ONNX Runtime GenAI's own generator, greedy: (its tokens, its logits for the last prompt position)."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt_ids, dtype=np.int32))
    prompt_logits = np.array(generator.get_output("logits"))[0, -1].copy()
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, prompt_logits


@pytest.mark.parametrize("model,target", [("qwen35-tiny", "cpu"), ("qwen35-tiny-moe", "cpu"),
                                          ("qwen35-tiny", "cpu-int4"), ("tiny-moe", "cpu")])
def test_genai_generates_what_qwen35c_runs(model, target, tmp_path, checkpoint_factory):
    """The genai export, run by onnxruntime-genai 0.18.0 itself: the same greedy tokens as the
    artifact's own session over several prompts and 64 new tokens, prompt logits within 1e-4."""
    pytest.importorskip("onnxruntime_genai")
    from qwen35c.build import build_artifact
    from qwen35c.models import resolve_model
    from qwen35c.runtime import load

    source = checkpoint_factory(model) if model == "tiny-moe" else resolve_model(model)
    art = tmp_path / "art"
    build_artifact(source, target, art, check=False)
    code, out = cli("export", art, "--format", "genai", "-o", tmp_path / "genai", "--max-length", "512")
    assert code == 0, out
    config = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config["model"]["type"] in ("qwen3_5_text", "qwen3_5_moe_text")
    session = load(art)
    if model == "tiny-moe":                                   # no tokenizer: token ids
        prompts = [[5 + 7 * i + j for j in range(3 + 11 * i)] for i in range(4)]
    else:
        prompts = [session.tokenizer.encode(text).ids for text in GENAI_PROMPTS]
    prompts.append(list(range(30, 30 + 70)))                  # crosses the 64-token chunk
    for ids in prompts:
        want = session.generate([ids], 64).tokens[0]
        got, logits = _genai_greedy(tmp_path / "genai", ids, 64)
        assert got == want, ids
        ours = session.prefill(torch.tensor([ids]), session.new_state(1, len(ids) + 1), last_only=True)[0, -1]
        assert np.abs(logits - ours.numpy()).max() <= 1e-4


@pytest.mark.parametrize("fmt", ["hf-fp8", "hf-awq"])
def test_the_moe_export_holds_quantized_routed_experts(fmt, tmp_path):
    from qwen35c.models import resolve_model

    assert cli("export", "qwen35-tiny-moe", "--format", fmt, "-o", tmp_path / fmt)[0] == 0
    back, qc = import_quantized(tmp_path / fmt)
    experts = [n for n in back.weights if ".mlp.experts." in n]
    config = json.loads((resolve_model("qwen35-tiny-moe") / "config.json").read_text())
    text = config.get("text_config", config)
    parts = 3 if fmt == "hf-fp8" or text["moe_intermediate_size"] >= 128 else 2   # INT4 g128: down_proj needs K >= 128
    assert len(experts) == text["num_hidden_layers"] * text["num_experts"] * parts
    assert all(torch.isfinite(back.weights[n].dequantize()).all() for n in experts)


class FakePythonBackend:
    """The part of Triton's `triton_python_backend_utils` a model.py uses, for an in-process harness:
    requests are dicts of named numpy tensors, responses keep their tensors or error."""

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError(Exception):
        pass

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return FakePythonBackend.Tensor(name, request[name]) if name in request else None


@pytest.fixture(scope="module")
def triton_artifact(tmp_path_factory):
    from qwen35c.build import build_artifact

    out = tmp_path_factory.mktemp("triton") / "art"
    build_artifact(default_model_path(), "h100-bf16", out, check=False)
    return out


def test_a_python_backend_entry_serves_a_triton_artifact(triton_artifact, tmp_path, monkeypatch):
    """model.py driven through initialize / execute with real tensors by the harness above: two
    interleaved sequences give the tokens `qwen35c run` gives (the kernels under the interpreter here)."""
    import importlib.util
    import sys

    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from qwen35c.runtime import load

    code, out = cli("export", triton_artifact, "--format", "triton-server", "-o", tmp_path / "repo", "--name", "q",
                    "--max-length", "128")
    assert code == 0, out
    entry = tmp_path / "repo" / "q"
    config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.sequence_batching.HasField("oldest")
    assert {c.name for c in config.sequence_batching.control_input} == {"START", "END", "CORRID"}
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakePythonBackend)
    spec = importlib.util.spec_from_file_location("entry_model", entry / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_repository": str(entry), "model_version": "1"})

    prompts = {7: [5, 17, 300], 8: list(range(40, 49))}                 # small: the interpreter runs every kernel
    want = load(triton_artifact).generate(list(prompts.values()), 4).tokens
    got = {c: [] for c in prompts}

    def send(corrid, ids, start=0, end=0):
        request = {"input_ids": np.array([ids], np.int64), "CORRID": np.array([[corrid]], np.uint64),
                   "START": np.array([[start]], np.int32), "END": np.array([[end]], np.int32)}
        (response,) = model.execute([request])
        assert response.error is None, response.error
        return int(response.output_tensors[0].as_numpy()[0].argmax())

    for corrid, ids in prompts.items():
        got[corrid].append(send(corrid, ids, start=1))
    for step in range(3):                                                # the two sequences interleaved
        for corrid in prompts:
            got[corrid].append(send(corrid, [got[corrid][-1]], end=int(step == 2)))
    assert [got[c] for c in prompts] == want
    assert model.sequences == {}                                         # END dropped both states
    (response,) = model.execute([{"input_ids": np.array([[1]]), "CORRID": np.array([[9]], np.uint64)}])
    assert isinstance(response.error, FakePythonBackend.TritonError) and "no START" in str(response.error)
