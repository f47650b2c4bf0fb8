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
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

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


def join_draft_head(model: onnx.ModelProto, head: onnx.ModelProto, states: set[str]) -> onnx.ModelProto:
    """`model` (with its `hidden` output) and `head` (the MTP graph) as one graph (module docstring).
    `states` are the head's state tensors, whose names and `.out` outputs are kept."""
    if {(o.domain, o.version) for o in model.opset_import} != {(o.domain, o.version) for o in head.opset_import}:
        raise QwenError("mtp.onnx and model.onnx import different opsets; they cannot run as one graph")
    if "hidden" not in {o.name for o in model.graph.output}:
        raise QwenError("model.onnx has no `hidden` output (built without its MTP head)")
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


__all__ = ["join_draft_head"]
