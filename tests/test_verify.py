"""`qwen35c verify`: passes on good artifacts (dense, MoE, Qwen3-Next), exit 1 on a broken one,
exit 2 without a reference; `--bisect` names the backend when every pass holds."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qwen35c.build import build_artifact
from qwen35c.cli import main


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-next"])
def test_build_then_verify_passes(checkpoint_factory, tmp_path, preset):
    ckpt = checkpoint_factory(preset)
    runner = CliRunner()
    result = runner.invoke(main, ["build", "--model", str(ckpt), "--target", "cpu", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["verify", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and {c["name"]: c["status"] for c in report["checks"]}["parity"] == "pass"
    assert report["parity"]["total"]["max_abs"] <= 1e-3 and report["parity"]["greedy_match"] == 1.0
    assert {"prefill T=63", "prefill T=129", "batch decode x8"} <= set(report["parity"]["cases"])


def _broken(graph):
    """A deliberately wrong backend input: the final norm's scale doubled (a real parity bug)."""
    final = graph.outputs[0].producer            # logits = linear(normed, lm_head)
    normed = final.inputs[0]
    two = graph.add_node("full", [], [normed.type.with_shape((1,))],
                         {"shape": [1], "value": 2.0, "dtype": normed.dtype}, before=final).output
    scaled = graph.add_node("mul", [normed, two], [normed.type], before=final).output
    final.inputs[0] = scaled
    return graph


def test_verify_fails_with_exit_1_on_broken_artifact(checkpoint_factory, tmp_path):
    ckpt = checkpoint_factory("tiny")
    out = tmp_path / "bad"
    build_artifact(ckpt, "cpu", out, check=False, extra_pipeline_hook=_broken)
    result = CliRunner().invoke(main, ["verify", str(out), "--json", "--bisect"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert {c["name"]: c["status"] for c in report["checks"]}["parity"] == "fail"
    assert report["bisect"]["first_broken"] == "backend:onnx"


def test_build_refuses_broken_artifact(checkpoint_factory, tmp_path):
    from qwen35c.verify import ParityFailure

    with pytest.raises(ParityFailure):
        build_artifact(checkpoint_factory("tiny"), "cpu", tmp_path / "bad", extra_pipeline_hook=_broken)
    assert list(tmp_path.iterdir()) == []


def test_missing_reference_is_exit_2(checkpoint_factory, tmp_path):
    ckpt = checkpoint_factory("tiny")
    build_artifact(ckpt, "cpu", tmp_path / "a", check=False)
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "a"), "--reference", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output
