"""The `quantized-activations` gate's yardstick: the emulating reference against itself with a
last-bit difference at every activation quantizer (`formats.last_bit_noise`, `verify.noise_floor`).
Another last-bit difference must pass the gate, a lowering bug must not: on the bundled qwen35-tiny
(trained, so its near-ties are real) with the h100-fp8 recipe, block-128 E4M3 dynamic activations."""

from __future__ import annotations

import json

import pytest
import torch

import qwen35c.quant.formats as formats
from qwen35c.backends.triton.emit import emulating_reference
from qwen35c.build import build_artifact
from qwen35c.models import default_model_path
from qwen35c.verify import PROMPT_SETS, _noisy, against, compare, gate, limits_of, noise_floor, prompt_plan


def test_last_bit_noise_moves_a_quantizer_input_by_at_most_one_ulp():
    weight = formats.fp8_quantize(torch.randn(128, 256))
    x = torch.randn(3, 256) * 10
    seen = []
    real = formats.fp8_fake_quant_activations
    formats.fp8_fake_quant_activations = lambda v, *a, **k: seen.append(v) or real(v, *a, **k)
    try:
        plain = formats.fake_quant_activations(x, weight)
        with formats.last_bit_noise(torch.Generator().manual_seed(0)):
            noisy = formats.fake_quant_activations(x, weight)
        with formats.last_bit_noise(torch.Generator().manual_seed(0)):
            again = formats.fake_quant_activations(x, weight)
    finally:
        formats.fp8_fake_quant_activations = real
    up, down = torch.nextafter(x, torch.tensor(torch.inf)), torch.nextafter(x, torch.tensor(-torch.inf))
    moved = seen[1] != x
    assert torch.equal(seen[0], x) and bool(((seen[1] == x) | (seen[1] == up) | (seen[1] == down)).all())
    assert 0.5 < moved.float().mean() < 0.8                                # two in three move
    assert torch.equal(noisy, again) and not torch.equal(plain, noisy)   # seeded; some codes flipped
    none = formats.fp8_quantize(torch.randn(128, 256), activations="none")
    with formats.last_bit_noise(torch.Generator().manual_seed(0)):       # weight-only: nothing to perturb
        assert torch.equal(formats.fake_quant_activations(x, none), x)


def test_the_gate_widens_to_the_floor_and_never_narrows():
    assert limits_of("quantized-activations", {"kl_mean": 1e-5, "top1": 1.0}) == {"kl_mean": 5e-4, "top1": 0.98}
    assert limits_of("quantized-activations", {"kl_mean": 4e-4, "top1": 0.95}) == pytest.approx(
        {"kl_mean": 8e-4, "top1": 0.93})
    with pytest.raises(ValueError, match="noise floor"):
        limits_of("quantized-activations")
    ok, failures = gate({"kl_mean": 9e-4, "top1": 0.99, "max_abs": 1.0}, "quantized-activations", None,
                        {"kl_mean": 4e-4, "top1": 0.95})
    assert not ok and "mean KL" in failures[0] and "noise floor" in failures[-1]


def test_the_top1_margin_is_what_the_floors_sample_size_can_tell():
    """Three standard deviations of two binomial rates on the floor's positions, never below 0.02:
    a flat-logit model (the 0.8b preset, random weights) on the full set, and a sharp one."""
    flat = limits_of("quantized-activations", {"kl_mean": 8.7e-4, "top1": 0.866, "positions": 575})
    assert flat["top1"] == pytest.approx(0.866 - 3 * (2 * 0.866 * 0.134 / 575) ** 0.5) and 0.80 < flat["top1"] < 0.81
    assert gate({"kl_mean": 1e-3, "top1": 0.828, "max_abs": 1.0}, "quantized-activations", None,
                {"kl_mean": 8.7e-4, "top1": 0.866, "positions": 575})[0]     # the build that failed
    assert gate({"kl_mean": 1e-3, "top1": 0.79, "max_abs": 1.0}, "quantized-activations", None,
                {"kl_mean": 8.7e-4, "top1": 0.866, "positions": 575})[0] is False
    sharp = limits_of("quantized-activations", {"kl_mean": 1e-4, "top1": 0.97, "positions": 100000})
    assert sharp["top1"] == pytest.approx(0.95)                                # the 0.02 floor


@pytest.fixture(scope="module")
def fp8_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "art"
    build_artifact(default_model_path(), "h100-fp8", out, check=False)
    return emulating_reference(default_model_path(), json.loads((out / "manifest.json").read_text())["quantization"])


def _with_activation_quantizer(session, quantizer):
    """`session` with FP8 activation quantization replaced by `quantizer` during its calls."""
    class Patched:
        def __getattr__(self, name):
            attr = getattr(session, name)
            if not callable(attr):
                return attr

            def call(*args, **kwargs):
                real, formats.fp8_fake_quant_activations = formats.fp8_fake_quant_activations, quantizer
                try:
                    return attr(*args, **kwargs)
                finally:
                    formats.fp8_fake_quant_activations = real
            return call
    return Patched()


def test_the_noise_floor_tells_a_lowering_bug_from_last_bit_noise(fp8_reference):
    floor = noise_floor(fp8_reference, "full")
    assert 1e-5 < floor["kl_mean"] < 5e-4 and floor["top1"] > 0.95   # measured 3.2e-4, 0.983
    plan = prompt_plan(fp8_reference.config.vocab_size, **PROMPT_SETS["full"])
    other = against(fp8_reference, {"other": _noisy(fp8_reference, plan, seed=1)})["other"]
    assert gate(other["total"], "quantized-activations", None, floor)[0]
    real = formats.fp8_fake_quant_activations
    bugs = {"per-token scales": lambda x, *a, **k: real(x, None),
            "no activation rounding": lambda x, *a, **k: x,
            "64-wide groups": lambda x, *a, **k: real(x, 64)}
    for name, quantizer in bugs.items():
        got = compare(_with_activation_quantizer(fp8_reference, quantizer), fp8_reference, **PROMPT_SETS["full"])
        ok, failures = gate(got["total"], "quantized-activations", None, floor)
        assert not ok and failures[0].startswith("mean KL"), (name, got["total"])


def test_a_routed_expert_models_floor_is_the_worst_of_three_recordings():
    """MoE floors are heavy-tailed (a last-bit flip that changes a token's experts jumps its logits):
    the floor is the worst of three noisy recordings there, one for a dense model; the worst is the
    recording with the largest KL, with the lowest top-1 of all of them."""
    from qwen35c.models import bundled
    from qwen35c.verify import _worst, floor_seeds
    from reference.config import load_config

    assert floor_seeds(load_config(bundled("qwen35-tiny-moe"))) == 3
    assert floor_seeds(load_config(bundled("qwen35-tiny"))) == 1
    floors = [{"kl_mean": 1e-4, "top1": 0.99, "max_abs": 0.3}, {"kl_mean": 4e-4, "top1": 0.995, "max_abs": 1.6},
              {"kl_mean": 2e-4, "top1": 0.98, "max_abs": 0.5}]
    assert _worst(floors) == {"kl_mean": 4e-4, "top1": 0.98, "max_abs": 1.6, "recordings": 3}
