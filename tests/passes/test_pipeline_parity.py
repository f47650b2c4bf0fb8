"""After the full pipeline, the interpreted stateful graph matches the reference model (fp32).

Prompt lengths straddle the 64-token chunk (1, 63, 64, 65, 130), each followed by 8 decode steps,
plus a right-padded batch of different lengths; on the dense, MoE and Qwen3-Next tiny presets.
Each preset is traced and compiled once (module-scoped fixture); the reference model runs in
inference mode. The `standard-fused` pipeline gets one boundary-length run per preset; the
per-pass bisection runs on all three.
"""

from __future__ import annotations

import pytest
import torch

from qwen35c.graph.session import GraphSession
from qwen35c.graph.trace import trace_config
from qwen35c.passes.manager import Pass, PassManager, PassResult, register_pass
from qwen35c.passes.parity import check_each_pass

# Max |dlogit| bounds, ~10x the worst measured over the three presets (1 and 2 threads):
TOL = 1e-4          # decode steps after a prefill: measured 1.5e-5
PREFILL_TOL = 2e-5  # prefill of 1..130 tokens: measured 1.9e-6
ROWS_TOL = 6e-5     # right-padded rows vs each row alone, prefill and decode: measured 6.1e-6
FUSED_TOL = 3e-5    # standard-fused, prefill and decode: measured 3.0e-6
EXACT_TOL = 1e-6    # the traced graph runs the reference's own ops: measured 0
PRESETS = ["tiny", "tiny-moe", "tiny-next"]
_FUSED: dict = {}   # preset -> the graph after the standard-fused pipeline (filled by the fixture)


@pytest.fixture(scope="module", params=PRESETS)
def compiled(request, tmp_path_factory):
    from reference.checkpoint import load_model, make_random_checkpoint, preset_config

    config = preset_config(request.param)
    ckpt = make_random_checkpoint(request.param, 0, tmp_path_factory.mktemp(request.param),
                                  dtype=torch.float32, std=0.1)
    model = load_model(ckpt, torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.setdefault("lm_head.weight", model.lm_head.weight)
    traced = trace_config(config).graph
    result = PassManager("standard", verify_each=True).run(traced.clone())
    fused = PassManager("standard-fused", verify_each=True).run(traced.clone())
    _FUSED[request.param] = fused.graph
    return config, model, traced, result.graph, lambda name: params[name].detach()



def _assert_close(got, want, what, tol=TOL):
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what}: max abs logit error {err:.3g} > {tol}"


@pytest.mark.parametrize("length", [1, 63, 64, 65, 130])
def test_prefill_then_decode_matches_reference(compiled, length):
    config, model, _traced, graph, weights = compiled
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, config.vocab_size, (2, length + 8), generator=gen)
    cache, session = model.new_cache(2, length + 8), GraphSession(graph, weights, 2, length + 8)
    with torch.no_grad():
        _assert_close(session.step(ids[:, :length]), model(ids[:, :length], cache), f"prefill T={length}",
                      PREFILL_TOL)
        for step in range(8):
            token = ids[:, length + step:length + step + 1]
            _assert_close(session.step(token), model(token, cache), f"decode step {step} after T={length}")


def test_batch_of_different_lengths_matches_each_row(compiled):
    config, model, _traced, graph, weights = compiled
    lengths = torch.tensor([70, 5, 64])
    ids = torch.randint(0, config.vocab_size, (3, 70), generator=torch.Generator().manual_seed(7))
    session = GraphSession(graph, weights, 3, 80)
    with torch.no_grad():
        got = session.step(ids, lengths)
        nxt = torch.randint(0, config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(8))
        got_next = session.step(nxt)
        for b in range(3):  # each row alone, unpadded, is the ground truth
            n = int(lengths[b])
            cache = model.new_cache(1, 80)
            _assert_close(got[b, :n], model(ids[b:b + 1, :n], cache)[0], f"row {b} prefill", ROWS_TOL)
            _assert_close(got_next[b], model(nxt[b:b + 1], cache)[0], f"row {b} decode after padding", ROWS_TOL)


def test_traced_graph_matches_reference_stateless(compiled):
    config, model, traced, _graph, weights = compiled
    from qwen35c.graph.interpreter import run

    ids = torch.randint(0, config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_close(run(traced, {"input_ids": ids}, weights)["logits"], model(ids), "traced", EXACT_TOL)


@register_pass
class _BreakEps(Pass):
    """test-break-eps: a deliberately broken pass (every norm eps becomes 0.5)."""

    name = "test-break-eps"

    def run(self, graph):
        hits = 0
        for node in graph.nodes:
            if node.op == "add_scalar" and node.attrs["scalar"] == pytest.approx(1e-6):
                node.attrs["scalar"] = 0.5
                hits += 1
        return PassResult(graph, bool(hits), hits)


def test_standard_fused_matches_reference(request, compiled):
    """The match passes keep parity: prefill across the chunk edge, then decode (one length)."""
    config, model, _traced, _graph, weights = compiled
    graph = compiled_fused(request)
    ops = graph.op_counts()
    assert ops.get("rms_norm", 0) > 0 and ops.get("rope", 0) > 0 and ops.get("swiglu", 0) > 0
    assert ops.get("gated_rms_norm", 0) > 0 and "rsqrt" not in ops
    ids = torch.randint(0, config.vocab_size, (2, 67), generator=torch.Generator().manual_seed(65))
    cache, session = model.new_cache(2, 67), GraphSession(graph, weights, 2, 67)
    with torch.no_grad():
        _assert_close(session.step(ids[:, :65]), model(ids[:, :65], cache), "fused prefill T=65", FUSED_TOL)
        for step in (65, 66):
            token = ids[:, step:step + 1]
            _assert_close(session.step(token), model(token, cache), f"fused decode at {step}", FUSED_TOL)


def compiled_fused(request):
    preset = request.node.callspec.params["compiled"]
    return _FUSED[preset]


def test_check_each_pass_names_the_broken_pass(compiled):
    _config, model, traced, _graph, _weights = compiled
    _g, _stats, report = check_each_pass(traced.clone(), "cleanup,fuse-deltanet,test-break-eps,insert-state",
                                         model)
    assert [p.ok for p in report.passes] == [True, True, True, False, False]
    assert report.first_broken == "test-break-eps"
    _g, _stats, report = check_each_pass(traced.clone(), "standard", model)
    assert report.first_broken is None, report.to_json()
