"""`qwen35c verify`: passes on good artifacts (dense, MoE, Qwen3-Next), exit 1 on a broken one,
exit 2 without a reference; `--bisect` names the backend when every pass holds, and the pass when one
breaks only past the 64-token chunk or only in decode."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from qwen35c.build import build_artifact
from qwen35c.cli import main
from qwen35c.passes.manager import Pass, PassResult, register_pass


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


def _node(graph, op, inputs, attrs=None):
    from qwen35c.graph.ops import infer_types

    attrs = attrs or {}
    return graph.add_node(op, inputs, infer_types(op, [v.type for v in inputs], attrs), attrs).outputs[0]


def _scale_logits_where(graph, mask):
    """logits *= 1.5 where mask (bool, broadcastable to [B, T, 1]): a pass bug confined to `mask`."""
    maskf = _node(graph, "cast", [mask], {"dtype": "f32"})
    if maskf.type.rank == 1:
        maskf = _node(graph, "reshape", [maskf], {"shape": ["B", 1, 1]})
    else:
        maskf = _node(graph, "reshape", [maskf], {"shape": ["B", "T", 1]})
    factor = _node(graph, "add_scalar", [_node(graph, "mul_scalar", [maskf], {"scalar": 0.5})], {"scalar": 1.0})
    graph.outputs[0] = _node(graph, "mul", [graph.outputs[0], factor])
    return graph


def _input(graph, name):
    return next(v for v in graph.inputs if v.name == name)


@register_pass
class _CorruptPastChunk(Pass):
    """test-corrupt-past-64: a deliberately broken pass (logits x1.5 at positions >= 64, stateful graph)."""

    name = "test-corrupt-past-64"

    def run(self, graph):
        start = _node(graph, "reshape", [_input(graph, "q_start")], {"shape": ["B", 1]})
        positions = _node(graph, "add", [start, _node(graph, "arange", [], {"size": "T", "dtype": "i64"})])
        edge = _node(graph, "full", [], {"shape": [1], "value": 64, "dtype": "i64"})
        return PassResult(_scale_logits_where(graph, _node(graph, "ge", [positions, edge])), True, 1)


@register_pass
class _CorruptDecode(Pass):
    """test-corrupt-decode: a deliberately broken pass (logits x1.5 in decode steps: one token on top
    of a non-empty state, q_start > 0 and lengths == 1)."""

    name = "test-corrupt-decode"

    def run(self, graph):
        zero = _node(graph, "full", [], {"shape": [1], "value": 0, "dtype": "i64"})
        one = _node(graph, "full", [], {"shape": [1], "value": 1, "dtype": "i64"})
        continued = _node(graph, "cast", [_node(graph, "gt", [_input(graph, "q_start"), zero])], {"dtype": "f32"})
        single = _node(graph, "cast", [_node(graph, "eq", [_input(graph, "lengths"), one])], {"dtype": "f32"})
        decode = _node(graph, "gt", [_node(graph, "mul", [continued, single]),
                                     _node(graph, "full", [], {"shape": [1], "value": 0.5, "dtype": "f32"})])
        return PassResult(_scale_logits_where(graph, decode), True, 1)


@pytest.mark.parametrize("bad_pass", ["test-corrupt-past-64", "test-corrupt-decode"])
def test_bisect_names_a_pass_broken_past_the_chunk_or_in_decode(checkpoint_factory, tmp_path, bad_pass):
    """A pass whose bug shows only past the 64-token chunk or only in decode is named by `verify
    --bisect`, not blamed on the backend (a 9-token prefill alone saw neither)."""
    from qwen35c.passes.manager import parse_pipeline, pipeline_to_text
    from qwen35c.targets import get_target

    pipeline = pipeline_to_text(parse_pipeline(get_target("cpu").full_pipeline()))
    assert pipeline.count("insert-state") == 1
    pipeline = pipeline.replace("insert-state", f"insert-state,{bad_pass}")
    out = tmp_path / "bad"
    build_artifact(checkpoint_factory("tiny"), "cpu", out, pipeline=pipeline, check=False)
    result = CliRunner().invoke(main, ["verify", str(out), "--json", "--bisect"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert {c["name"]: c["status"] for c in report["checks"]}["parity"] == "fail"
    assert report["bisect"]["first_broken"] == bad_pass, report["bisect"]
    passes = {p["name"]: p for p in report["bisect"]["passes"]}
    assert passes["insert-state"]["ok"] and not passes[bad_pass]["ok"]
    worst = passes[bad_pass]["worst_case"]
    assert ("decode" in worst) if bad_pass == "test-corrupt-decode" else ("65" in worst or "129" in worst), worst


@pytest.mark.parametrize("full_passes", [True, False])
def test_a_statistical_check_failed_on_the_short_set_is_decided_on_the_full_set(monkeypatch, full_passes):
    """A slow backend checks a statistical gate on the short prompt set first; a failure there (one or
    two near-tie flips in ~90 positions) is rechecked on the full set, whose verdict stands."""
    import qwen35c.build as build
    import qwen35c.verify as verify

    calls, alive = [], []

    class Session:
        config, mode = SimpleNamespace(vocab_size=100), "test"

    def fake_record(session, plan):
        alive.append(weakref.ref(session))
        return plan

    def fake_parity(recorded, reference, precision, against="reference"):
        assert all(ref() is None for ref in alive)      # the artifact is gone before the reference runs
        prompts = "full" if len(recorded.singles) == len(verify.PROMPT_SETS["full"]["single"]) else "short"
        calls.append(prompts)
        ok = prompts == "full" and full_passes
        return {"passed": ok, "status": "pass" if ok else "fail", "summary": "pass" if ok else "top-1 0.9767 < 0.98"}

    class Slow:   # no statistical_check_prompts: the short set first
        def load(self, *args, **kwargs):
            return Session()

        def reference(self, *args):
            return "reference", "quantized-activations", "quantization-emulating reference"

    monkeypatch.setattr(verify, "quick_parity", fake_parity)
    monkeypatch.setattr(verify, "record", fake_record)
    manifest = {"quantization": {"recipe": {"activations": "int8"}}}
    result = build._check(Slow(), Path("."), manifest, Path("."), None)
    assert calls == ["short", "full"] and result["passed"] == full_passes
    assert result["summary"].endswith("(the short prompt set failed; the full set decided)")


@pytest.mark.parametrize("target, passes", [("cpu", 1), ("cpu-int4", 3)])
def test_the_build_check_reads_each_reference_layer_once_a_pass(checkpoint_factory, tmp_path, monkeypatch, target,
                                                                 passes):
    """The check's streamed reference computes every position of the prompt set teacher-forced, decode
    steps and greedy continuation included, in one pass over its layers (it used to take one per
    decode step). cpu-int4: sequential quantization's pass, the noisy twin's (the statistical gate's
    floor) and the reference's."""
    from collections import Counter

    from reference.stream import StreamedModel

    loads, real = Counter(), StreamedModel.load_layer
    monkeypatch.setattr(StreamedModel, "load_layer", lambda self, index: loads.update([index]) or real(self, index))
    ckpt = checkpoint_factory("tiny")
    report = build_artifact(ckpt, target, tmp_path / "a")
    assert report.manifest["parity"]["passed"], report.manifest["parity"]
    layers = json.loads((ckpt / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert loads == Counter({index: passes for index in range(layers)})


def test_greedy_match_reads_the_reference_teacher_forced_on_the_artifact_continuation():
    """Rows agree up to where they part; a parting at a logit tie within `tie` counts the row as matched
    (and is reported), a real one ends the row's matched prefix."""
    import torch

    from qwen35c.verify import _greedy_match

    def logits(*rows):   # one [len, 4] tensor per row, the reference's top-1 first in each step's tuple
        out = []
        for row in rows:
            t = torch.zeros(len(row), 4)
            for j, (top, second) in enumerate(row):
                t[j, top], t[j, second] = 1.0, 1.0 - 1e-4
            out.append(t)
        return out

    want = logits([(1, 2), (3, 0), (2, 1)], [(0, 1), (1, 2), (2, 3)])
    assert _greedy_match([[1, 3, 2], [0, 1, 2]], want, tie=0.0) == (1.0, 0)
    assert _greedy_match([[1, 0, 0], [0, 1, 2]], want, tie=2e-4) == (1.0, 1)       # step 1: 0 is tied with 3
    assert _greedy_match([[1, 2, 2], [0, 1, 2]], want, tie=2e-4) == (4 / 6, 0)     # step 1: 2 is not
    assert _greedy_match([[1, 3, 2], [0, 1, 3]], want, tie=1e-5) == (5 / 6, 0)
