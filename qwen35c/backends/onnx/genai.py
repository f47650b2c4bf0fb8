"""An onnx artifact's graph with ONNX Runtime GenAI's input/output conventions for Qwen3.5.

GenAI 0.18 (`onnxruntime-genai==0.18.0`, model types `qwen3_5_text` / `qwen3_5_moe_text`, the names
its own builder gives this family) feeds and reads:
  input_ids [B, S], attention_mask [B, total] (1 for every token so far),
  past.{i}.conv [B, C, K-1] (channels first), past.{i}.recurrent [B, Hv, K, V],
  past_key_values.{i}.key|value [B, Hkv, max_length, D], the buffer it shares with present.{i}.key|value
  (`past_present_share_buffer`: this step's keys are written at the sequence's position);
  -> logits [B, 1, V] (the last position, as the builder's `prune_lm_head`), present.{i}.*.
Our graph takes q_start / lengths / logit_positions and channels-last conv states, and writes its KV
cache in place at q_start: the same contract as GenAI's shared buffer. So the graph is adapted, not
GenAI: q_start = sum(attention_mask) - S, lengths = S, logit_positions = S - 1 (per row), the conv
states transposed in and out, every state renamed through an Identity (ORT removes them). The
weights are untouched (the external data file is the artifact's, byte for byte). GenAI's builder
graphs also take `position_ids` [3, B, S] (text-only MRoPE: three equal rows); ours derives each
position from q_start, so the adapted graph declares no such input and GenAI feeds none.

Batches: GenAI left-pads prompts of different lengths, our graph right-pads; the adapted graph is
exact for one sequence per generator, or sequences of equal length (what the tests check).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from qwen35c.errors import QwenError

GENAI_VERSION = "0.18.0"
_MODEL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_text": "qwen3_5_text",
                "qwen3_5_moe": "qwen3_5_moe_text", "qwen3_5_moe_text": "qwen3_5_moe_text"}


def genai_model_type(config: dict) -> str:
    text = config.get("text_config", config)
    kind = text.get("model_type") or config.get("model_type")
    if kind not in _MODEL_TYPES:
        raise QwenError(f"model_type '{kind}': ONNX Runtime GenAI {GENAI_VERSION} runs Qwen3.5 "
                        f"({', '.join(sorted(set(_MODEL_TYPES.values())))}); not this model")
    return _MODEL_TYPES[kind]


def _layer(key: str) -> int:
    # manifest state keys: "layers.{i}.conv" | "layers.{i}.recurrent" | "layers.{i}.key_cache" | ...
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise QwenError(f"state key '{key}' is not 'layers.<i>.<kind>'")
    return int(parts[1])


def adapt(model_file: Path, states: list[dict], out_file: Path) -> dict:
    """Write the GenAI form of `model_file` to `out_file` (its external data file already beside it);
    returns the genai_config `inputs` / `outputs` name maps."""
    proto = onnx.load(str(model_file), load_external_data=False)
    graph = proto.graph
    old_inputs = {v.name: v for v in graph.input}
    old_outputs = {v.name: v for v in graph.output}
    for name in ("input_ids", "q_start", "lengths", "logit_positions"):
        if name not in old_inputs:
            raise QwenError(f"{model_file}: no input '{name}': not a qwen35c onnx graph")
    nodes: list[onnx.NodeProto] = []        # before the graph's own nodes (inputs), after them (outputs)
    tail: list[onnx.NodeProto] = []
    inputs = [old_inputs["input_ids"],
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    vocab = old_outputs["logits"].type.tensor_type.shape.dim[2].dim_value
    # the last position only: GenAI sizes its logits buffer from this static 1 (prune_lm_head's form)
    outputs = [helper.make_tensor_value_info("logits", old_outputs["logits"].type.tensor_type.elem_type,
                                             ["batch_size", 1, vocab])]

    def const(name, values):
        nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name + ".value", TensorProto.INT64, [len(values)], values)))

    # q_start = sum(attention_mask, 1) - S; lengths = S (per row); logit_positions = [[S - 1]] per row
    const("genai.axis1", [1])
    const("genai.one", [1])
    const("genai.col", [-1, 1])
    nodes += [helper.make_node("Shape", ["input_ids"], ["genai.shape"]),
              helper.make_node("Gather", ["genai.shape", "genai.one"], ["genai.S"], axis=0),
              helper.make_node("ReduceSum", ["attention_mask", "genai.axis1"], ["genai.total"], keepdims=0),
              helper.make_node("Sub", ["genai.total", "genai.S"], ["q_start"]),
              helper.make_node("Sub", ["genai.total", "q_start"], ["lengths"]),      # S, one per row
              helper.make_node("Sub", ["lengths", "genai.one"], ["genai.last"]),
              helper.make_node("Reshape", ["genai.last", "genai.col"], ["logit_positions"])]

    names = {"inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
             "outputs": {"logits": "logits"}}
    patterns = {"conv": ("past.%d.conv", "present.%d.conv", "past_conv_names", "present_conv_names"),
                "recurrent": ("past.%d.recurrent", "present.%d.recurrent", "past_recurrent_names",
                              "present_recurrent_names"),
                "key_cache": ("past_key_values.%d.key", "present.%d.key", "past_key_names", "present_key_names"),
                "value_cache": ("past_key_values.%d.value", "present.%d.value", "past_value_names",
                                "present_value_names")}
    for spec in states:
        kind = spec["key"].split(".")[-1]
        if kind not in patterns:
            raise QwenError(f"state '{spec['name']}' ({spec['key']}): no GenAI convention for '{kind}' states")
        past, present, past_key, present_key = patterns[kind]
        names["inputs"][past_key], names["outputs"][present_key] = past, present
        layer = _layer(spec["key"])
        past, present = past % layer, present % layer
        if spec["name"] not in old_inputs or spec["output"] not in old_outputs:
            raise QwenError(f"{model_file}: state '{spec['name']}' is not an input/output pair of the graph")
        old_in = old_inputs[spec["name"]]
        dims = [d.dim_value or d.dim_param for d in old_in.type.tensor_type.shape.dim]
        elem = old_in.type.tensor_type.elem_type
        if kind == "conv":              # ours [B, K-1, C], GenAI's [B, C, K-1]
            genai_dims = ["batch_size", dims[2], dims[1]]
            nodes.append(helper.make_node("Transpose", [past], [spec["name"]], perm=[0, 2, 1]))
            tail.append(helper.make_node("Transpose", [spec["output"]], [present], perm=[0, 2, 1]))
        else:
            seq = "past_sequence_length" if kind.endswith("_cache") else None
            genai_dims = ["batch_size"] + [seq if d == "S" else d for d in dims[1:]]
            nodes.append(helper.make_node("Identity", [past], [spec["name"]]))
            tail.append(helper.make_node("Identity", [spec["output"]], [present]))
        out_dims = [("total_sequence_length" if d == "past_sequence_length" else d) for d in genai_dims]
        inputs.append(helper.make_tensor_value_info(past, elem, genai_dims))
        outputs.append(helper.make_tensor_value_info(present, elem, out_dims))
    # commit (speculative verify steps) is an overridable initializer: left out of the inputs, its
    # default (-1: "lengths") becomes a constant
    known = {"input_ids", "q_start", "lengths", "logit_positions", "commit"} | {s["name"] for s in states}
    extra = sorted(set(old_inputs) - known)
    if extra:
        raise QwenError(f"{model_file}: input '{extra[0]}' has no GenAI counterpart")
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body + tail)
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.extend(outputs)
    out_file.write_bytes(proto.SerializeToString(deterministic=True))
    try:                            # by path: the external data is resolved beside the file
        onnx.checker.check_model(str(out_file))
    except onnx.checker.ValidationError as err:
        raise QwenError(f"{out_file}: the adapted graph is not valid ONNX ({err})") from None
    return names


__all__ = ["GENAI_VERSION", "adapt", "genai_model_type"]
