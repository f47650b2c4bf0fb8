"""Sequential (layer-by-layer) quantization: layer 0 is packed exactly as the whole-model path packs
it (same inputs), later layers are calibrated on the quantized model's activations (so they differ),
experts are packed one by one, `prepare` never loads the whole model, and the streamed emulating
reference equals the resident `emulate` bit for bit."""

from __future__ import annotations

import pytest
import torch

from qwen35c.quant import calibrate, emulate, parse_scheme, quantize_model
from qwen35c.quant.model import restrict
from qwen35c.quant.policy import plan_model
from qwen35c.quant.sequential import quantize_sequential
from qwen35c.quant.build import Prepared
from reference.checkpoint import load_model
from reference.stream import StreamedModel


def _batches(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (1, 32), generator=gen) for _ in range(4)]


def _packed_equal(a, b) -> bool:
    from qwen35c.passes.quantize import packed_parts

    pa, pb = packed_parts(a), packed_parts(b)
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("scheme", ["int4-gptq", "int4-awq"])
def test_sequential_layer0_matches_one_shot_and_later_layers_see_quantized_inputs(checkpoint_factory, scheme):
    path = checkpoint_factory("tiny-moe")
    model = load_model(path)
    recipe = parse_scheme(scheme, group_size=16)
    batches = _batches(model.config.vocab_size)
    one_shot = quantize_model(model, recipe, calibrate.collect(model, batches))
    streamed = quantize_sequential(StreamedModel(path), recipe, plan_model(model, recipe), batches)
    assert streamed.weights.keys() == one_shot.weights.keys()
    layer0 = [n for n in one_shot.weights if n.startswith("model.layers.0.")]
    last = [n for n in one_shot.weights if n.startswith("model.layers.3.")]
    assert any(".experts." in n for n in layer0)                         # experts packed one by one too
    assert all(_packed_equal(streamed.weights[n], one_shot.weights[n]) for n in layer0)
    assert not all(_packed_equal(streamed.weights[n], one_shot.weights[n]) for n in last)


def test_prepare_never_loads_the_whole_model(checkpoint_factory, monkeypatch):
    """`prepare` (and its emulating reference) must stream: the resident loader is off limits."""
    import reference.checkpoint
    from qwen35c.quant.build import prepare

    path = checkpoint_factory("tiny")
    model = load_model(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("load_model called: the whole model was loaded")

    monkeypatch.setattr(reference.checkpoint, "load_model", forbidden)
    recipe = parse_scheme("int4-gptq", group_size=16)
    units = [d.canonical for d in plan_model(model, recipe) if d.quantize]
    prepared = prepare(path, {"recipe": recipe.to_dict(), "quantized": units})
    assert sorted(prepared.quantized.weights) == sorted(units)
    assert prepared.record["calibration"]["order"].startswith("sequential")
    again = prepare(path, {"recipe": recipe.to_dict(), "quantized": units})
    assert again.record["packed_sha256"] == prepared.record["packed_sha256"]   # reproducible digest

    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = emulate(model, prepared.quantized)(ids)
    assert torch.equal(prepared.emulated()(ids), want)                   # streamed emulation, bit-equal
    assert not torch.equal(prepared.model(ids), want)                    # and it really is quantized


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_emulation_of_quantized_experts_and_head(checkpoint_factory, monkeypatch, tied):
    """Bit-equal to the resident emulation, and with a quantized head (tied or not) it holds no
    [V, H] table: lookups gather checkpoint rows, the head is dequantized a slice of rows at a time."""
    from qwen35c.quant.model import EmulatedLinear

    path = checkpoint_factory("tiny-moe", tie_word_embeddings=tied)
    model = load_model(path)
    assert model.config.tie_word_embeddings == tied
    recipe = parse_scheme("int4-rtn", group_size=16, include=("lm_head.weight",))
    decisions = restrict(plan_model(model, recipe), None, "")
    quantized = quantize_sequential(StreamedModel(path), recipe, decisions, None)
    assert "lm_head.weight" in quantized.weights
    monkeypatch.setattr(EmulatedLinear, "RESIDENT_ROWS", 128)          # vocab 512: four slices
    streamed = Prepared(quantized, path, {}).emulated()
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids), emulate(model, quantized)(ids))
    table, _, head = streamed.edges()
    assert table is None and isinstance(head, EmulatedLinear) and head.weight is None
