"""The layout clean-up pass: cancelling Reshapes/Transposes go, everything else keeps its values."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qwen35c.backends.onnx.simplify import simplify

SHAPES = {"s_fold": [0, 3, 4], "s_back": [0, 12], "s_split": [4, -1], "s_keep": [0, 2, 3], "s_flat": [0, -1]}


def run(nodes, outputs, feeds):
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in SHAPES.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in feeds],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def check(nodes, outputs, shapes, feeds):
    """Simplify, then the same outputs as before; returns the op types left."""
    before = run([helper.make_node(n.op_type, n.input, n.output, **{a.name: helper.get_attribute_value(a)
                                                                 for a in n.attribute}) for n in nodes], outputs, feeds)
    constants = {k: np.asarray(v, np.int64) for k, v in SHAPES.items()}
    kept = simplify(nodes, shapes, {}, constants, set(outputs))
    for got, want in zip(run(kept, outputs, feeds), before):
        np.testing.assert_array_equal(got, want)
    return [n.op_type for n in kept]


def test_transposes_cancel_and_compose():
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1, 3]),      # identity: gone
             helper.make_node("Sigmoid", ["b"], ["y"]),
             helper.make_node("Transpose", ["x"], ["c"], perm=[1, 0, 2, 3]),
             helper.make_node("Transpose", ["c"], ["z"], perm=[0, 2, 1, 3])]      # one Transpose left
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5), np.float32)
    ops = check(nodes, ["y", "z"], {"x": ("B", 3, 4, 5)}, {"x": x})
    assert ops == ["Sigmoid", "Transpose"]


def test_reshape_chains_fold_when_the_copied_dims_agree():
    nodes = [helper.make_node("Reshape", ["x", "s_fold"], ["a"]),          # (B, 12) -> (B, 3, 4)
             helper.make_node("Reshape", ["a", "s_back"], ["b"]),          # -> (B, 12) = x: both go
             helper.make_node("Sigmoid", ["b"], ["y"])]
    x = np.random.default_rng(1).standard_normal((5, 12), np.float32)
    assert check(nodes, ["y"], {"x": ("B", 12)}, {"x": x}) == ["Sigmoid"]


def test_reshape_chain_kept_when_a_copied_dim_changes():
    nodes = [helper.make_node("Reshape", ["x", "s_split"], ["a"]),         # (8, 3) -> (4, 6)
             helper.make_node("Reshape", ["a", "s_keep"], ["y"])]          # 0 copies a's 4, not x's 8
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    assert check(nodes, ["y"], {"x": (8, 3)}, {"x": x}) == ["Reshape", "Reshape"]


def test_identity_reshape_on_known_symbolic_shape():
    nodes = [helper.make_node("Reshape", ["x", "s_flat"], ["a"]),   # (B, T, 6) -> (B, 6T)
             helper.make_node("Sigmoid", ["a"], ["y"]),
             helper.make_node("Reshape", ["y", "s_flat"], ["z"]),   # (B, 6T) -> (B, 6T): identity
             helper.make_node("Sigmoid", ["z"], ["out"])]
    x = np.random.default_rng(2).standard_normal((2, 3, 6), np.float32)
    ops = check(nodes, ["out"], {"x": ("B", "T", 6)}, {"x": x})
    assert ops == ["Reshape", "Sigmoid", "Sigmoid"]


def test_unknown_shapes_and_graph_outputs_are_left_alone():
    nodes = [helper.make_node("Reshape", ["x", "s_flat"], ["y"]),        # identity, but y is an output
             helper.make_node("Reshape", ["w", "s_flat"], ["v"]),
             helper.make_node("Sigmoid", ["v"], ["u"]),                  # w's shape is unknown
             helper.make_node("Sigmoid", ["x"], ["dead"])]               # nobody reads it: pruned
    x = np.ones((4, 5), np.float32)
    ops = check(nodes, ["y", "u"], {"x": (4, 5)}, {"x": x, "w": x})
    assert ops == ["Reshape", "Reshape", "Sigmoid"]


@pytest.mark.parametrize("spec,expect", [(("B*T", 2, "T*4"), (8, ("B", "T", "T"))), ((3,), (3, ()))])
def test_symbolic_dims(spec, expect):
    from qwen35c.backends.onnx.simplify import dim, prod_dims
    assert prod_dims(tuple(dim(d) for d in spec)) == expect
