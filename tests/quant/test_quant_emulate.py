"""Calibration coverage (every expert) and the quantization-emulating reference."""

from __future__ import annotations

import pytest
import torch

from qwen35c.errors import QwenError
from qwen35c.quant import calibrate, emulate, parse_scheme, quantize_model, weight_errors
from qwen35c.quant.model import EmulatedLinear, EmulatedMoeBlock
from reference.checkpoint import load_model


@pytest.fixture(scope="module")
def moe(checkpoint_factory):
    model = load_model(checkpoint_factory("tiny-moe", hidden_size=256, moe_intermediate_size=128))
    ids = torch.randint(0, 512, (3, 48), generator=torch.Generator().manual_seed(0))
    return model, ids


def _kl(model, other, ids):
    with torch.no_grad():
        p = model(ids).float().log_softmax(-1)
        q = other(ids).float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_calibration_reaches_every_expert(moe):
    model, ids = moe
    every = calibrate.collect(model, [ids[i:i + 1] for i in range(3)], mode="all")
    routed = calibrate.collect(model, [ids[i:i + 1] for i in range(3)], mode="routed")
    name = "model.layers.{}.mlp.experts.{}.{}.weight"
    for layer in range(4):
        for e in range(4):
            assert every.inputs[name.format(layer, e, "gate_proj")].shape[0] == ids.numel()
            assert every.inputs[name.format(layer, e, "down_proj")].shape == (ids.numel(), 128)
        counts = [routed.inputs[name.format(layer, e, "up_proj")].shape[0] for e in range(4)]
        assert sum(counts) == 2 * ids.numel()                                   # top-2 routing
    assert every.inputs["model.layers.0.linear_attn.in_proj_qkv.weight"].shape == (ids.numel(), 256)
    assert float(every.amax["model.layers.0.mlp.experts.1.down_proj.weight"]) > 0
    # calibration does not change the model's output
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))


def test_calibrated_recipes_need_calibration(moe):
    model, _ = moe
    with pytest.raises(QwenError, match="calibration"):
        quantize_model(model, parse_scheme("int4-gptq"))


@pytest.mark.parametrize("scheme", ["fp8-block128", "fp8-channel", "fp8-tensor", "int4-rtn", "int4-awq", "int4-gptq"])
def test_emulation_quality_and_structure(scheme, moe):
    model, ids = moe
    calib = calibrate.collect(model, [ids[i:i + 1] for i in range(3)])
    # why: AWQ/GPTQ are slow on one core; experts 1-3 add nothing the dense units and expert 0 do not cover
    cheap = ("*.experts.[123].*",) if scheme in ("int4-awq", "int4-gptq") else ()
    quantized = quantize_model(model, parse_scheme(scheme, exclude=cheap), calib)
    emulated = emulate(model, quantized)
    assert isinstance(emulated.model.layers[0].mlp, EmulatedMoeBlock)
    assert isinstance(emulated.model.layers[0].linear_attn.in_proj_qkv, EmulatedLinear) == scheme.startswith("fp8")
    assert not isinstance(emulated.model.layers[0].linear_attn.in_proj_a, EmulatedLinear)
    assert isinstance(model.model.layers[0].mlp.shared_expert.up_proj, torch.nn.Linear)   # original untouched
    kl = _kl(model, emulated, ids)
    assert 0 < kl < (5e-3 if scheme.startswith("fp8") else 0.05), kl
    errors = weight_errors(model, quantized, calib)["summary"]
    assert errors["weight_rel_mean"] < (0.05 if scheme.startswith("fp8") else 0.25)


def test_dynamic_activation_fake_quant_matters(moe):
    """The FP8 emulation quantizes activations; dropping that changes the output (so verify can
    attribute activation rounding to quantization, not to the kernel)."""
    model, ids = moe
    quantized = quantize_model(model, parse_scheme("fp8-block128"))
    with_act = emulate(model, quantized)
    weight_only = emulate(model, quantize_model(model, parse_scheme("fp8-block128", activations="none")))
    with torch.no_grad():
        assert not torch.equal(with_act(ids), weight_only(ids))
    layer = with_act.model.layers[3].self_attn.o_proj
    x = torch.randn(2, 5, layer.in_features)
    from qwen35c.backends.triton.gemm import naive
    twin = naive.fp8_linear(x.view(-1, layer.in_features), layer.qweight.weight, layer.qweight.scale).view(2, 5, -1)
    with torch.no_grad():
        assert torch.allclose(layer(x), twin, rtol=1e-5, atol=1e-6)


def test_emulation_of_unquantized_recipe_is_identity(moe):
    model, ids = moe
    quantized = quantize_model(model, parse_scheme("int4-rtn", exclude=("*",)))
    assert not quantized.weights
    with torch.no_grad():
        assert torch.equal(emulate(model, quantized)(ids), model(ids))


@pytest.mark.parametrize("make", ["int4-sym", "int4-asym", "fp8-block", "fp8-channel", "fp8-tensor"])
def test_row_slices_and_a_head_dequantized_in_slices(make, monkeypatch):
    """`row_slice` dequantizes to the same rows as the whole matrix; an EmulatedLinear over more than
    RESIDENT_ROWS rows (an LM head) holds no fp32 copy and gives the resident one's outputs."""
    from qwen35c.quant.formats import fp8_quantize, int4_quantize, row_slice

    w = torch.randn(1000, 256, generator=torch.Generator().manual_seed(1))
    kind, _, how = make.partition("-")
    q = int4_quantize(w, 128, symmetric=how == "sym") if kind == "int4" else fp8_quantize(w, how)
    whole = q.dequantize()
    for begin, end in ((0, 256), (256, 1000), (512, 640)):
        assert torch.equal(row_slice(q, begin, end).dequantize(), whole[begin:end])
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(1000)
    resident = EmulatedLinear(q, bias, torch.float32)
    monkeypatch.setattr(EmulatedLinear, "RESIDENT_ROWS", 256)
    sliced = EmulatedLinear(q, bias, torch.float32)
    assert resident.weight is not None and sliced.weight is None
    assert torch.allclose(sliced(x), resident(x), rtol=0, atol=1e-5)   # measured 0 (the same dot products)
    assert torch.equal(sliced.dequantized(), whole)
