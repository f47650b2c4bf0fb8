"""Precision policy: exact module matching, defaults per scheme, include/exclude globs, quant-plan."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qwen35c.cli import main
from qwen35c.errors import QwenError
from qwen35c.quant.policy import classify, plan, plan_checkpoint
from qwen35c.quant.recipe import Recipe, parse_scheme

ROLES = {
    "model.language_model.layers.0.mlp.gate.weight": "router",
    "model.layers.0.mlp.gate.weight": "router",
    "model.layers.0.mlp.gate_proj.weight": "mlp",
    "model.layers.0.mlp.gate_up_proj.weight": "unknown",          # not a Qwen3.5 name: never guessed
    "model.layers.0.mlp.experts.gate_up_proj": "experts_fused",
    "model.layers.0.mlp.experts.7.gate_proj.weight": "expert",
    "model.layers.0.mlp.shared_expert.up_proj.weight": "shared_expert",
    "model.layers.0.mlp.shared_expert_gate.weight": "shared_expert_gate",
    "model.layers.0.linear_attn.in_proj_b.weight": "gdn_gate",
    "model.layers.0.linear_attn.in_proj_ba.weight": "gdn_gate",
    "model.layers.0.linear_attn.in_proj_qkv.weight": "gdn_proj",
    "model.layers.0.linear_attn.in_proj_qkvz.weight": "gdn_proj",
    "model.layers.0.linear_attn.conv1d.weight": "conv1d",
    "model.layers.0.linear_attn.A_log": "ssm_param",
    "model.layers.0.linear_attn.norm.weight": "norm",
    "model.layers.3.self_attn.q_proj.weight": "attention",
    "model.layers.3.self_attn.q_norm.weight": "norm",
    "model.embed_tokens.weight": "embedding",
    "lm_head.weight": "lm_head",
    "mtp.layers.0.mlp.experts.0.gate_proj.weight": "mtp",
    "model.visual.blocks.0.attn.qkv.weight": "vision",
    "xmodel.layers.0.mlp.gate.weight": "unknown",
}


@pytest.mark.parametrize("name,role", ROLES.items())
def test_classify_is_exact(name, role):
    assert classify(name) == role


def _specs():
    specs = [("model.layers.0.mlp.gate.weight", (4, 256)), ("model.layers.0.mlp.experts.gate_up_proj", (4, 256, 256)),
             ("model.layers.0.mlp.experts.down_proj", (4, 256, 128)),
             ("model.layers.0.mlp.shared_expert_gate.weight", (1, 256)),
             ("model.layers.1.linear_attn.in_proj_a.weight", (16, 256)),
             ("model.layers.1.linear_attn.in_proj_qkv.weight", (512, 256)),
             ("model.layers.1.mlp.gate_proj.weight", (320, 256)), ("model.layers.1.mlp.down_proj.weight", (256, 320)),
             ("model.layers.3.self_attn.o_proj.weight", (256, 256)), ("lm_head.weight", (512, 256)),
             ("model.norm.weight", (256,))]
    return specs


def _quantized(decisions):
    return {d.name for d in decisions if d.quantize}


def test_fp8_defaults():
    q = _quantized(plan(_specs(), parse_scheme("fp8-block128")))
    assert "model.layers.0.mlp.gate.weight" not in q
    assert "model.layers.0.mlp.shared_expert_gate.weight" not in q
    assert "model.layers.1.linear_attn.in_proj_a.weight" not in q and "lm_head.weight" not in q
    assert {"model.layers.1.linear_attn.in_proj_qkv.weight", "model.layers.3.self_attn.o_proj.weight",
            "model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.experts.3.up_proj.weight",
            "model.layers.0.mlp.experts.0.down_proj.weight"} <= q
    assert not any(n.endswith("experts.gate_up_proj") for n in q)   # fused tensors planned per expert


def test_int4_defaults_and_globs():
    decisions = plan(_specs(), parse_scheme("int4-rtn"))
    q = _quantized(decisions)
    assert "model.layers.1.linear_attn.in_proj_qkv.weight" not in q
    assert "model.layers.3.self_attn.o_proj.weight" not in q
    assert "model.layers.1.mlp.down_proj.weight" not in q           # K=320 is not a multiple of 128
    assert "model.layers.1.mlp.gate_proj.weight" in q and "model.layers.0.mlp.experts.1.gate_proj.weight" in q
    recipe = parse_scheme("int4-rtn", include=("*.self_attn.*",), exclude=("*.experts.0.*",))
    q = _quantized(plan(_specs(), recipe))
    assert "model.layers.3.self_attn.o_proj.weight" in q
    assert not any(".experts.0." in n for n in q) and "model.layers.0.mlp.experts.1.down_proj.weight" in q
    # a glob that matches nothing is a typo, not a no-op; norms can never be quantized
    with pytest.raises(QwenError, match="match no tensor"):
        plan(_specs(), parse_scheme("int4-rtn", include=("*.mlp.gat",)))
    d = {x.name: x for x in plan(_specs(), parse_scheme("fp8-block128", include=("model.norm.weight",)))}
    assert not d["model.norm.weight"].quantize


def test_recipe_round_trips_and_validates():
    r = parse_scheme("int4-gptq", group_size=64, act_order=True, include=("a*",))
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert parse_scheme("fp8-tensor").activations == "static"
    with pytest.raises(QwenError):
        parse_scheme("fp8-block128", activations="static")
    with pytest.raises(QwenError):
        parse_scheme("int4", group_size=96)
    with pytest.raises(QwenError):
        parse_scheme("nf4")


def test_quant_plan_command(checkpoint_factory):
    path = checkpoint_factory("tiny-moe", hidden_size=256, moe_intermediate_size=128)
    result = CliRunner().invoke(main, ["quant-plan", str(path), "--scheme", "fp8-block128", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    by_name = {t["name"]: t for t in out["tensors"]}
    assert not by_name["model.language_model.layers.0.mlp.gate.weight"]["quantize"]
    assert by_name["model.language_model.layers.0.mlp.experts.2.gate_proj.weight"]["quantize"]
    assert by_name["model.language_model.layers.0.mlp.experts.2.gate_proj.weight"]["source"] == \
        "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert len(plan_checkpoint(path, parse_scheme("fp8-block128"))) == len(out["tensors"])
    result = CliRunner().invoke(main, ["quant-plan", str(path), "--scheme", "int4-awq", "--exclude", "nothing*"])
    assert result.exit_code == 2 and "match no tensor" in result.output
    result = CliRunner().invoke(main, ["quant-plan", str(path), "--scheme", "int4-awq"])
    assert result.exit_code == 0 and "int4-awq-g128" in result.output
