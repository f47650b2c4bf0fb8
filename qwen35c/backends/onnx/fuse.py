"""The model and its MTP head as one ONNX graph: a speculative step that drafts as it verifies.

Run as two sessions, the head cost more than it saved on a CPU (each draft a second ORT run after
the model's, with its own thread pool and a cold cache: 0.85 ms between verify steps against 0.32 ms
alone on the bundled tiny model). Joined, one run per step verifies the drafts and drafts the next
token: the head reads, beside the model's hidden state h_i at every position i of the step, the token
after position i, which is

    the step's own next input token     where it is known (a pending token: it was committed),
    the model's argmax at i             where the model is judging (i >= commit - 1: under greedy
                                        decoding that is the token accepted after i, draft or bonus),

chosen per position by the `next_ids` input (a token id, or -1 for the argmax; -1 only at logit
positions). The head's argmax at each logit position comes back as `draft` i64[B, P]: after the
step, the draft at the last accepted position is the next step's first draft. Its `mtp_hidden`
f32[B, T, H] comes back too, for chained drafts (the head run alone, `mtp.onnx`).

The join happens at load time from the two checked graphs (`model.onnx`, `mtp.onnx`), so an artifact
holds no third graph: the head's nodes and intermediate tensors are renamed under `mtp/`, its state
tensors keep their own names (they already differ from the model's: the head's layer index is
num_hidden_layers), and an initializer that holds what one of the model's holds (the same place in
the model's data file, or the same bytes) is the model's own, not a second copy.

A draft vocabulary (`vocab`: the first N token ids, QWEN35C_DRAFT_VOCAB) cuts the head's LM head to
its first N rows, which are a prefix of the same bytes in the data file (the tied embedding [V, H] of
a Gemm, a MatMulNBits' packed rows and scales): the head's draft reads N/V of the 0.8b's 135 MB int4
head, and a token past N is never drafted. FR-Spec (Zhao et al., 2025) drafts over the most frequent
tokens; a BPE vocabulary numbers its tokens by merge order, frequent first, so its first ids stand in
for the most frequent ones (the bundled tokenizer: the first 2048 of 4096 ids are 92% of the
held-out text's tokens).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen35c.errors import QwenError

PREFIX = "mtp/"
SHARED = ("q_start", "lengths", "logit_positions", "hidden")   # head inputs that are the model's tensors


def _identity(tensor: TensorProto):
    """What an initializer holds: (file, offset, length) where it is stored as external data, else
    its type, shape and bytes (the head's own copies of small constants such as the rotary
    frequencies; sharing them lets ORT's common-subexpression pass merge the head's position
    arithmetic into the model's)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        entry = {e.key: e.value for e in tensor.external_data}
        return entry.get("location"), entry.get("offset", "0"), entry.get("length")
    copy = TensorProto()
    copy.CopyFrom(tensor)
    copy.name = ""
    return copy.SerializeToString(deterministic=True)


def _first_rows(tensor: TensorProto, rows: int, name: str) -> TensorProto:
    """`tensor`'s first `rows` rows (along dim 0) as a new initializer: external data keeps its file
    and offset with a shorter length; inline data is sliced."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.from_array(numpy_helper.to_array(tensor)[:rows], name)
    cut = TensorProto()
    cut.CopyFrom(tensor)
    cut.name = name
    cut.dims[0] = rows
    row = int(np.prod(tensor.dims[1:], dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    for entry in cut.external_data:
        if entry.key == "length":
            entry.value = str(rows * row)
    return cut


def _draft_vocabulary(head: onnx.GraphProto, vocab: int, size: int) -> None:
    """Cut `head`'s LM head (in place) to its first `size` of `vocab` rows (module docstring)."""
    producers = {out: node for node in head.node for out in node.output}
    initializers = {t.name: t for t in head.initializer}
    node, reshape = producers["logits"], None
    if node.op_type == "Reshape":            # Gemm's [B * P, V] back to [B, P, V]
        reshape, node = node, producers.get(node.input[0])
    weight = initializers.get(node.input[1]) if node is not None and len(node.input) > 1 else None
    head.initializer.append(numpy_helper.from_array(np.array([size], np.int64), "draft_vocab/size"))
    if node is not None and node.op_type == "MatMul" and weight is not None and list(weight.dims)[-1:] == [vocab]:
        # an untied head stored [H, V]: its first columns are no prefix, so ORT folds a Slice of them
        # into an [H, N] initializer of its own at load time (N/V of the head's memory)
        head.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "draft_vocab/start"),
                                 numpy_helper.from_array(np.array([1], np.int64), "draft_vocab/axis")])
        head.node.insert(list(head.node).index(node), helper.make_node(
            "Slice", [weight.name, "draft_vocab/start", "draft_vocab/size", "draft_vocab/axis"], ["draft_vocab/weight"]))
        node.input[1] = "draft_vocab/weight"
    elif node is not None and (node.op_type == "MatMulNBits" or (
            node.op_type == "Gemm" and len(node.input) == 2 and
            any(a.name == "transB" and a.i == 1 for a in node.attribute))):
        for i, name in enumerate(node.input[1:], 1):      # row-major over the vocabulary: a prefix
            tensor = initializers.get(name)
            if tensor is not None and tensor.dims and tensor.dims[0] == vocab:
                cut = _first_rows(tensor, size, f"draft_vocab/{name}")
                head.initializer.append(cut)
                node.input[i] = cut.name
            elif tensor is not None and tensor.dims:
                raise QwenError(f"mtp.onnx: LM head input '{name}' {list(tensor.dims)} is not row-major over the vocabulary")
        for attribute in node.attribute:
            if attribute.name == "N":
                attribute.i = size
    else:
        raise QwenError(f"mtp.onnx: a draft vocabulary needs the head's LM head as a Gemm(transB=1) over [V, H], "
                        f"a MatMul over [H, V] or a MatMulNBits; it is a {getattr(node, 'op_type', 'graph input')}")
    _resize(reshape, producers, initializers, vocab)


def _resize(reshape, producers: dict, initializers: dict, vocab: int) -> None:
    """The Reshape after the LM head (if any) gets the draft vocabulary's size for its constant
    vocabulary dimension."""
    if reshape is None:
        return
    shape = producers.get(reshape.input[1])
    sizes = [j for j, x in enumerate(shape.input) if x in initializers and
             numpy_helper.to_array(initializers[x]).tolist() == [vocab]] if shape is not None else []
    if shape is None or shape.op_type != "Concat" or len(sizes) != 1:
        raise QwenError("mtp.onnx: cannot find the vocabulary dimension of the LM head's output shape")
    shape.input[sizes[0]] = "draft_vocab/size"


def with_draft_vocabulary(head: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """`head` (mtp.onnx) drafting among its first `size` token ids (a copy; `head` itself when `size`
    is 0 or not below the vocabulary)."""
    vocab = next(o for o in head.graph.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    if not 0 < size < vocab:
        return head
    trimmed = onnx.ModelProto()
    trimmed.CopyFrom(head)
    _draft_vocabulary(trimmed.graph, vocab, size)
    return trimmed


def join_draft_head(model: onnx.ModelProto, head: onnx.ModelProto, states: set[str],
                    vocab: int = 0) -> onnx.ModelProto:
    """`model` (with its `hidden` output) and `head` (the MTP graph) as one graph (module docstring).
    `states` are the head's state tensors, whose names and `.out` outputs are kept; `vocab` > 0 (and
    below the vocabulary) drafts among the first `vocab` token ids only."""
    if {(o.domain, o.version) for o in model.opset_import} != {(o.domain, o.version) for o in head.opset_import}:
        raise QwenError("mtp.onnx and model.onnx import different opsets; they cannot run as one graph")
    if "hidden" not in {o.name for o in model.graph.output}:
        raise QwenError("model.onnx has no `hidden` output (built without its MTP head)")
    head = with_draft_vocabulary(head, vocab)
    joined = onnx.ModelProto()
    joined.CopyFrom(model)
    graph = joined.graph
    known = {_identity(t): t.name for t in model.graph.initializer}
    names = {name: name for name in (*SHARED, "mtp_hidden", *states, *(f"{s}.out" for s in states))}
    names["input_ids"] = "mtp/next_ids"
    for tensor in head.graph.initializer:
        shared = known.get(_identity(tensor))
        if shared is not None:
            names[tensor.name] = shared
            continue
        copy = graph.initializer.add()
        copy.CopyFrom(tensor)
        copy.name = names.setdefault(tensor.name, PREFIX + tensor.name)

    def rename(name: str) -> str:
        return name if not name else names.setdefault(name, PREFIX + name)

    # the token after each position: next_ids where given, else the model's argmax at that logit position
    graph.node.extend([
        helper.make_node("ArgMax", ["logits"], ["mtp/argmax"], axis=-1, keepdims=0),
        helper.make_node("Shape", ["input_ids"], ["mtp/ids_shape"]),
        helper.make_node("ConstantOfShape", ["mtp/ids_shape"], ["mtp/zeros"],
                         value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])),
        helper.make_node("ScatterElements", ["mtp/zeros", "logit_positions", "mtp/argmax"], ["mtp/argmax_at"], axis=1),
        helper.make_node("Constant", [], ["mtp/zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        helper.make_node("GreaterOrEqual", ["next_ids", "mtp/zero"], ["mtp/known"]),
        helper.make_node("Where", ["mtp/known", "next_ids", "mtp/argmax_at"], ["mtp/next_ids"]),
    ])
    for node in head.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise QwenError(f"mtp.onnx: node '{node.name}' ({node.op_type}) has a subgraph; the join does not rename inside one")
        copy = graph.node.add()
        copy.CopyFrom(node)
        copy.name = PREFIX + node.name
        copy.ClearField("input")
        # the shape of the head's ids is the step's: read it off the model's input, so that ORT's
        # common-subexpression pass can merge the head's position arithmetic into the model's
        copy.input.extend("input_ids" if node.op_type == "Shape" and x == "input_ids" else rename(x) for x in node.input)
        copy.ClearField("output")
        copy.output.extend(rename(x) for x in node.output)
    graph.node.append(helper.make_node("ArgMax", [rename("logits")], ["draft"], axis=-1, keepdims=0))
    graph.input.append(helper.make_tensor_value_info("next_ids", TensorProto.INT64, ["B", "T"]))
    graph.input.extend(i for i in head.graph.input if i.name in states)
    for output in head.graph.output:
        if output.name == "mtp_hidden" or output.name[:-len(".out")] in states:
            graph.output.append(output)
    graph.output.append(helper.make_tensor_value_info("draft", TensorProto.INT64, ["B", "P"]))
    return joined


__all__ = ["join_draft_head", "with_draft_vocabulary"]
