"""bench/bench_onnx.py: the side-by-side driver on a tiny cpu-int4 artifact (ours against the eager
reference, workers taking turns), and the bytes-per-decode-token accounting it reports for every engine."""

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_onnx.py"
spec = importlib.util.spec_from_file_location("bench_onnx", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_onnx_weight_bytes_skips_tables_only_gathered(tmp_path):
    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")      # read one row a token
    w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")                 # read whole
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [table, w])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert bench.onnx_weight_bytes(str(tmp_path / "m.onnx")) == 8 * 4 * 4
    nodes.append(helper.make_node("MatMul", ["x", "table_t"], ["logits"]))         # a tied head: read whole
    graph.initializer.append(numpy_helper.from_array(np.zeros((8, 100), np.float32), "table_t"))
    graph.node.append(nodes[-1])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert bench.onnx_weight_bytes(str(tmp_path / "m.onnx")) == 8 * 4 * 4 + 8 * 100 * 4


def _gguf(path: Path, tensors: list[tuple[str, list[int], int]]) -> None:
    def string(s):
        return struct.pack("<Q", len(s)) + s.encode()
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2)
    out += string("general.architecture") + struct.pack("<I", 8) + string("qwen35")
    out += string("tokens") + struct.pack("<IIQ", 9, 4, 2) + struct.pack("<ii", 1, 2)
    for name, dims, kind in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", kind, 0)
    path.write_bytes(out)


def test_gguf_weight_bytes_counts_a_tied_table_once(tmp_path):
    tied = [("token_embd.weight", [64, 1000], 14), ("blk.0.ffn_down.weight", [256, 64], 2)]   # Q6_K, Q4_0
    _gguf(tmp_path / "tied.gguf", tied)
    q6k, q4_0 = 64 * 1000 // 256 * 210, 256 * 64 // 32 * 18
    assert bench.gguf_weight_bytes(str(tmp_path / "tied.gguf")) == q6k + q4_0
    _gguf(tmp_path / "untied.gguf", tied + [("output.weight", [64, 1000], 0)])            # F32 head
    assert bench.gguf_weight_bytes(str(tmp_path / "untied.gguf")) == q4_0 + 64 * 1000 * 4


def test_bench_onnx_side_by_side_smoke(checkpoint_factory, tmp_path):
    from qwen35c.build import build_artifact

    ckpt = checkpoint_factory("tiny-moe")
    art = tmp_path / "art"
    build_artifact(ckpt, "cpu-int4", art, quantize="int4-rtn group-size=16", check=False)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip-build", "--out", str(art), "--model", str(ckpt),
                           "--threads", "1", "--contexts", "8", "--new", "2", "--repeats", "2", "--peers", "reference"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report["engines"]) == {"ours", "reference"}
    assert all(len(e["raw@8"]) == 2 and e["decode_tok_s@8"] > 0 for e in report["engines"].values())
    manifest = json.loads((art / "manifest.json").read_text())
    model = onnx.load(art / manifest["backend"]["model"], load_external_data=False)
    assert "QMoE" in {n.op_type for n in model.graph.node}
    per_token = bench.onnx_weight_bytes(str(art / manifest["backend"]["model"])) + bench.state_bytes(str(art), 8)
    assert report["decode_bytes_per_token_mb"]["ours"]["@8"] == round(per_token / 1e6, 1)
    assert "reference" not in report["decode_bytes_per_token_mb"]       # no file to count for the eager model
