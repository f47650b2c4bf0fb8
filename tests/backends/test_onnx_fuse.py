"""The draft vocabulary of the joined MTP head (qwen35c/backends/onnx/fuse.py): the head's LM head cut
to its first N rows by pointing at a prefix of the same bytes (or, for an [H, V] MatMul, a Slice ORT
folds). Its twin is the full head's logits sliced to [:, :N], on hand-made heads in the three layouts
the emitter writes (a tied Gemm over [V, H], an untied MatMul over [H, V], a MatMulNBits over packed
rows), stored as external data like an artifact's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen35c.backends.onnx.fuse import _draft_vocabulary
from qwen35c.errors import QwenError

V, H, BLOCK = 40, 64, 32


def _external(tensor: np.ndarray, name: str, data) -> TensorProto:
    """`tensor` written to the shared data file at a 64-byte-aligned offset, as an external initializer."""
    offset = -data.tell() % 64
    data.write(b"\0" * offset)
    offset = data.tell()
    data.write(tensor.tobytes())
    proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(tensor.dtype), dims=tensor.shape,
                        data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "head.data"), ("offset", str(offset)), ("length", str(tensor.nbytes))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto


def _head(kind: str, directory) -> onnx.ModelProto:
    """A one-node LM head over x [B * P, H] -> logits, its weights in `directory`/head.data."""
    rng = np.random.default_rng(0)
    with open(directory / "head.data", "wb") as data:
        if kind == "gemm":
            weight = _external(rng.standard_normal((V, H)).astype(np.float32), "w", data)
            nodes = [helper.make_node("Gemm", ["x", "w"], ["flat"], transB=1),
                     helper.make_node("Concat", ["minus_one", "vocab"], ["shape"], axis=0),
                     helper.make_node("Reshape", ["flat", "shape"], ["logits"])]
            inits = [weight, numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
                     numpy_helper.from_array(np.array([V], np.int64), "vocab")]
        elif kind == "matmul":      # an untied head, stored [H, V]
            inits = [_external(rng.standard_normal((H, V)).astype(np.float32), "w", data)]
            nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"])]
        else:
            packed = rng.integers(0, 256, (V, H // BLOCK, BLOCK // 2), dtype=np.uint8)
            scales = rng.uniform(0.01, 0.1, (V, H // BLOCK)).astype(np.float32)
            inits = [_external(packed, "b", data), _external(scales, "scales", data)]
            nodes = [helper.make_node("MatMulNBits", ["x", "b", "scales"], ["logits"], domain="com.microsoft",
                                      K=H, N=V, bits=4, block_size=BLOCK)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", H])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, directory, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["gemm", "matmul", "matmulnbits"])
@pytest.mark.parametrize("size", [1, 7, 39])
def test_draft_vocabulary_is_the_full_heads_first_logits(kind, size, tmp_path):
    head = _head(kind, tmp_path)
    x = np.random.default_rng(1).standard_normal((3, H)).astype(np.float32)
    full = _run(head, tmp_path, x)
    cut = onnx.ModelProto()
    cut.CopyFrom(head)
    _draft_vocabulary(cut.graph, V, size)
    got = _run(cut, tmp_path, x)
    assert full.shape[-1] == V and got.shape[-1] == size
    np.testing.assert_array_equal(got, full[..., :size])
    originals = {t.name: t for t in head.graph.initializer}
    for tensor in cut.graph.initializer:     # no bytes copied: a prefix of the original's place
        if tensor.name.startswith("draft_vocab/") and tensor.data_location == TensorProto.EXTERNAL:
            before = {e.key: e.value for e in originals[tensor.name[len("draft_vocab/"):]].external_data}
            after = {e.key: e.value for e in tensor.external_data}
            assert (after["location"], after["offset"]) == (before["location"], before["offset"])
            assert int(after["length"]) * V == int(before["length"]) * size


def test_draft_vocabulary_refuses_a_head_it_cannot_cut(tmp_path):
    head = _head("gemm", tmp_path)
    gemm = head.graph.node[0]
    gemm.ClearField("attribute")       # Gemm without transB: [H, V] columns are not a prefix
    with pytest.raises(QwenError, match="draft vocabulary"):
        _draft_vocabulary(head.graph, V, 8)
