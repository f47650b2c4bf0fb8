"""The custom-op contract (STYLE lesson 4): every qwen35:: op has a schema, an eager and a fake
implementation that agree on shapes and dtypes, a docstring, and survives torch.export whole with a
dynamic sequence length."""

from __future__ import annotations

import pytest
import torch

from reference import ops

GEN = torch.Generator().manual_seed(0)


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def _samples():
    batch, length, channels, window = 2, 5, 12, 4
    yield ops.causal_conv1d, (_r(batch, length, channels), _r(channels, window), _r(batch, channels, window - 1),
                              torch.tensor([5, 3]))
    yield ops.gated_delta_rule, (_r(batch, length, 2, 8), _r(batch, length, 2, 8), _r(batch, length, 4, 8),
                                 -torch.rand(batch, length, 4, generator=GEN), torch.rand(batch, length, 4, generator=GEN),
                                 _r(batch, 4, 8, 8))
    yield ops.attention, (_r(batch, 4, length, 16), _r(batch, 2, 9, 16), _r(batch, 2, 9, 16),
                          torch.tensor([4, 0]), torch.tensor([9, 5]))
    yield ops.moe, (_r(7, 16), _r(4, 16), _r(4, 12, 16), _r(4, 16, 6), 2, True)


@pytest.mark.parametrize("op, args", list(_samples()), ids=lambda x: getattr(x, "__name__", ""))
def test_opcheck(op, args):
    """torch.library.opcheck: schema, fake tensor and dispatch consistency."""
    results = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert results == {"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}, results


def test_registry_names_and_docs():
    registered = {name for name in dir(torch.ops.qwen35) if not name.startswith("_") and name != "name"}
    registered = {n for n in registered if isinstance(getattr(torch.ops.qwen35, n), torch._ops.OpOverloadPacket)}
    assert registered == {"causal_conv1d", "gated_delta_rule", "attention", "moe"}
    for name in registered:
        assert getattr(ops, name).__doc__, f"qwen35::{name} has no docstring"
        assert callable(getattr(ops, f"{name}_eager")), f"qwen35::{name} has no eager twin"


def test_export_keeps_ops_whole_with_dynamic_length(checkpoint_factory):
    """torch.export of the stateless reference model on the meta device: one node per custom op
    call and a symbolic sequence length (a Python chunk loop would have specialised it)."""
    from reference.config import load_config
    from reference.model import Qwen35ForCausalLM

    config = load_config(checkpoint_factory("tiny-moe"))
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config).eval()
        ids = torch.zeros(2, 70, dtype=torch.long)
    length = torch.export.Dim("T", min=2, max=4096)
    program = torch.export.export(model, (ids,), dynamic_shapes=({1: length},))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("qwen35.gated_delta_rule.default") == 3
    assert targets.count("qwen35.causal_conv1d.default") == 3
    assert targets.count("qwen35.attention.default") == 1
    assert targets.count("qwen35.moe.default") == 4
    out = [n for n in program.graph.nodes if n.op == "output"][0].args[0][0]
    assert not isinstance(out.meta["val"].shape[1], int), "sequence length was specialised"
