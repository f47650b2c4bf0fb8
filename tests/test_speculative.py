"""Speculative decoding: the commit step (the fused GDN op against its naive twin, the ONNX graph
against running only the committed tokens), the compiled MTP head against the reference MTP module,
and `generate(speculative=K)` against plain decoding: token-for-token greedy equality whatever the
drafts (the tiny presets' MTP heads are random), the sampling distribution, and the acceptance the
bundled models' trained heads reach."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen35c.build import build_artifact
from qwen35c.errors import QwenError
from qwen35c.passes.fuse_deltanet import gated_deltanet_naive, gated_deltanet_ref
from qwen35c.runtime import load
from qwen35c.runtime.speculative import Draft, PromptLookup, Replay

NK, NV, DK, DV, K = 2, 4, 16, 12, 4    # grouped value heads, a head dim that is not a power of 2
SAME = 2e-5      # a K+1-token pass against 1-token passes of the same artifact (fp32 rounding)


def _gdn_inputs(length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    channels = 2 * NK * DK + NV * DV
    return [torch.randn(3, length, channels, generator=gen), torch.randn(3, length, NV, generator=gen),
            torch.randn(3, length, NV, generator=gen), torch.randn(channels, K, generator=gen) * 0.5,
            torch.empty(NV).uniform_(0, 2.5, generator=gen), torch.randn(NV, generator=gen),
            torch.randn(3, channels, K - 1, generator=gen), torch.randn(3, NV, DK, DV, generator=gen)]


@pytest.mark.parametrize("length", [1, 63, 64, 65, 129])
def test_commit_keeps_only_committed_tokens(length):
    """gated_deltanet with commit < lengths: outputs are the ordinary step's at every valid position,
    the states are those of a step over the committed tokens alone; the fused op equals its twin."""
    args = _gdn_inputs(length, length)
    dims = dict(num_k_heads=NK, num_v_heads=NV, head_k_dim=DK, head_v_dim=DV, chunk_size=16)
    lengths = torch.tensor([length, max(1, length - 2), max(1, length // 2)])
    commit = torch.tensor([max(0, length - 3), 0, max(1, length // 2)])
    o, conv, state = gated_deltanet_ref(*args, lengths, commit, **dims)
    o_twin, conv_twin, state_twin = gated_deltanet_naive(*args, lengths, commit, **dims)
    o_plain, _, _ = gated_deltanet_ref(*args, lengths, **dims)
    _, conv_kept, state_kept = gated_deltanet_ref(*args, commit, **dims)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(o[b, :n], o_plain[b, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[b, :n], o_twin[b, :n], rtol=1e-5, atol=1e-5)
    assert torch.equal(conv, conv_kept) and torch.equal(conv, conv_twin)
    torch.testing.assert_close(state, state_kept, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_twin, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["tiny", "tiny-moe", "tiny-next"])
def session(request, checkpoint_factory, tmp_path_factory):
    ckpt = checkpoint_factory(request.param)
    out = tmp_path_factory.mktemp("spec") / request.param
    build_artifact(ckpt, "cpu", out)
    return load(out)


def _prefilled(session, prompts):
    state = session.new_state(len(prompts), max(map(len, prompts)) + 16)
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    session.prefill(ids, state, torch.tensor([len(p) for p in prompts]), last_only=True)
    return state


def test_extend_state_equals_committed_tokens(session):
    """A verify step (rows of different lengths and commits, one committing nothing) leaves exactly
    the state of a step over the committed tokens, and its logits are those of plain decode steps."""
    gen = np.random.default_rng(0)
    vocab = session.config.vocab_size
    prompts = [gen.integers(0, vocab, n).tolist() for n in (63, 64, 65)]
    new = gen.integers(0, vocab, (3, 4))
    lengths, commit = np.array([4, 3, 2]), np.array([2, 0, 1])
    spec = _prefilled(session, prompts)
    logits = session.extend(torch.from_numpy(new), spec, lengths, commit)
    kept = _prefilled(session, prompts)
    session.prefill(torch.from_numpy(new[:, :2]), kept, torch.from_numpy(commit))
    assert spec.q_start.tolist() == kept.q_start.tolist()
    for s in session.specs:
        if "cache" not in s["name"]:
            assert np.abs(spec.numpy(s["name"]) - kept.numpy(s["name"])).max() <= SAME, s["name"]
    plain = _prefilled(session, prompts)
    for t in range(4):
        step = session.decode(torch.from_numpy(new[:, t:t + 1]), plain)[:, 0]
        for b in range(3):
            if t < lengths[b]:
                assert (logits[b, t] - step[b]).abs().max() <= SAME, (b, t)
    nxt = torch.from_numpy(gen.integers(0, vocab, (3, 1)))
    assert (session.decode(nxt, spec) - session.decode(nxt, kept)).abs().max() <= SAME
    with pytest.raises(QwenError, match="commit"):
        session.extend(torch.from_numpy(new), spec, lengths, lengths + 1)


def test_speculative_greedy_equals_plain(session, monkeypatch):
    """54 prompts (lengths 1 to 140, around the 64-token GDN chunk and across a 32-token prefill
    chunk), batched with different lengths: speculative greedy == plain greedy, for K = 1, 2, 3,
    perfect, noisy, always-wrong, prompt-lookup and (tiny, tiny-moe) MTP-head drafts, rows stopping
    at different times."""
    monkeypatch.setenv("QWEN35C_PREFILL_CHUNK", "32")
    gen = np.random.default_rng(1)
    vocab = session.config.vocab_size
    sizes = [1, 2, 5, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 140]
    prompts = [gen.integers(0, vocab, sizes[i % len(sizes)]).tolist() for i in range(48)]
    loop = [3, 4, 5] * 8          # repetitive prompts, so prompt lookup has something to find
    prompts += [(loop * 12)[:n] for n in (7, 30, 64, 65, 100, 129)]
    stop = (int(gen.integers(vocab)),)
    checked = 0
    for start in range(0, len(prompts), 9):
        batch = prompts[start:start + 9]
        plain = session.generate(batch, 20, stop_ids=stop).tokens
        drafters = [Replay(batch, plain, 0.0, vocab), Replay(batch, plain, 0.35, vocab, start),
                    Replay(batch, plain, 1.0, vocab, start), PromptLookup()]
        drafters += ["mtp"] if session.drafts else []     # the model joined with its head
        for k, drafter in zip((1 + start % 3, 2, 3, 2, 3 - start % 3), drafters):
            result = session.generate(batch, 20, stop_ids=stop, speculative=k, drafter=drafter)
            assert result.tokens == plain, (start, k, drafter)
            checked += len(batch)
    assert checked == (5 if session.drafts else 4) * len(prompts) and len(prompts) >= 50
    perfect = session.generate(prompts[:9], 20, speculative=3,
                               drafter=Replay(prompts[:9], session.generate(prompts[:9], 20).tokens, 0.0, vocab))
    assert perfect.acceptance == 1.0 and perfect.decode_steps <= math.ceil(19 / 4)


def test_mtp_head_matches_the_reference_mtp(session):
    """The compiled MTP head (mtp.onnx) against the resident reference model's MTP module on the
    artifact's own hidden states: a batch of rows of different lengths in one step (its hidden
    states at every pair, the logits of each row's last), then the same pairs fed over two steps
    (its KV cache), then a chained pair one position on (the drafter's second draft)."""
    from reference.checkpoint import load_model

    if not session.drafts:
        assert session.config.mtp_num_hidden_layers == 0    # tiny-next: no head, nothing compiled
        assert not (session.directory / "mtp.onnx").exists()
        return
    model = load_model(session.manifest["source"]["path"])
    head = session.draft_head()
    gen = np.random.default_rng(2)
    sizes = [1, 40, 65]
    ids = [gen.integers(0, session.config.vocab_size, n + 1).tolist() for n in sizes]
    hidden = [session.prefill(torch.tensor([p[:-1]]), session.new_state(1, len(p)), extras=True)[1]["hidden"]
              for p in ids]
    width = max(sizes)
    pairs, states = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, session.config.hidden_size)
    for b, (p, h) in enumerate(zip(ids, hidden)):
        pairs[b, :sizes[b]], states[b, :sizes[b]] = torch.tensor(p[1:]), h[0]
    logits, mtp_hidden = head.draft_step(pairs, states, head.new_state(3, width + 1), [0, 0, 0], sizes)
    split_state = head.new_state(3, width + 2)
    cut = [n // 2 for n in sizes]
    head.draft_step(pairs, states, split_state, [0, 0, 0], cut)
    rest = [torch.roll(x, -c, dims=0) for x, c in zip(pairs, cut)], [torch.roll(x, -c, dims=0) for x, c in zip(states, cut)]
    split, _ = head.draft_step(torch.stack(rest[0]), torch.stack(rest[1]), split_state, cut,
                               [n - c for n, c in zip(sizes, cut)])
    np.testing.assert_allclose(split, logits, rtol=0, atol=SAME)
    with torch.no_grad():
        for b, (p, h) in enumerate(zip(ids, hidden)):
            n = sizes[b]
            want = model.mtp(h, model.model.embed_tokens(torch.tensor([p[1:]])), torch.arange(1, n + 1)[None])
            torch.testing.assert_close(torch.from_numpy(mtp_hidden[b, :n]), want[0], rtol=0, atol=SAME)
            torch.testing.assert_close(torch.from_numpy(logits[b]), model.lm_head(want[0, -1]), rtol=0, atol=SAME)
            draft = int(logits[b].argmax())          # the chained pair (the head's own state, its draft)
            chained = model.mtp(torch.cat([h, want[:, -1:]], 1), model.model.embed_tokens(torch.tensor([p[1:] + [draft]])),
                                torch.arange(1, n + 2)[None])
            got, _ = head.draft_step(torch.tensor([[draft]]), want[:, -1:].numpy(),
                                     _fed(head, torch.tensor([p[1:]]), h), [n], [1])
            torch.testing.assert_close(torch.from_numpy(got[0]), model.lm_head(chained[0, -1]), rtol=0, atol=SAME)


def test_joined_head_drafts_what_the_head_alone_drafts(session, monkeypatch):
    """The model joined with its head (`drafting()`, the graph speculative decoding with the head
    runs) against the two graphs run apart, on a batch of different lengths around the 32-token
    prefill chunk and the 64-token GDN chunk: the same logits and hidden states; the head's states
    at every pair whose next token is the prompt's; and each row's draft, the head's argmax on the
    pair (last hidden state, the model's argmax). Then a speculative step (commit 2 of 4 tokens):
    the head's states at every position of the step, and its last draft."""
    if not session.drafts:
        return
    monkeypatch.setenv("QWEN35C_PREFILL_CHUNK", "32")
    joined, head = session.drafting(), session.draft_head()
    assert session.drafting() is joined and joined.drafting() is joined
    gen = np.random.default_rng(3)
    sizes = [1, 31, 33, 64, 65, 70]
    ids = torch.zeros(len(sizes), max(sizes), dtype=torch.long)
    for b, n in enumerate(sizes):
        ids[b, :n] = torch.from_numpy(gen.integers(0, session.config.vocab_size, n))
    state = joined.new_state(len(sizes), max(sizes) + 8)
    logits, out = joined.prefill(ids, state, torch.tensor(sizes), extras=True)
    alone, plain = session.prefill(ids, session.new_state(len(sizes), max(sizes)), torch.tensor(sizes), extras=True)
    for b, n in enumerate(sizes):
        torch.testing.assert_close(logits[b, :n], alone[b, :n], rtol=0, atol=SAME)
        hidden = plain["hidden"][b:b + 1, :n]
        pairs = torch.cat([ids[b:b + 1, 1:n], logits[b:b + 1, n - 1].argmax(-1, keepdim=True)], 1)
        want_logits, want_hidden = head.draft_step(pairs, hidden, head.new_state(1, n), [0], [n])
        np.testing.assert_allclose(out["mtp_hidden"][b, :n].numpy(), want_hidden[0], rtol=0, atol=SAME)
        assert int(out["draft"][b, n - 1]) == int(want_logits[0].argmax())
    # a verify step on row 0 (prompt: 1 token) alone: 4 tokens, 2 committed. The head reads, as the
    # token after each position, the step's next token at position 0 of the step and the model's
    # argmax from the last pending one on; the prefill left the pair (h_0, the model's argmax) behind
    first = int(logits[0, 0].argmax())
    step = torch.from_numpy(gen.integers(0, session.config.vocab_size, (1, 4)))
    got, out = joined.extend(step, state.row(0), [4], [2], extras=True)
    _, main = session.prefill(torch.cat([ids[:1, :1], step], 1), session.new_state(1, 5), extras=True)
    pairs = torch.cat([step[:, 1:2], got[:, 1:].argmax(-1)], 1)
    cache = _fed(head, torch.tensor([[first]]), main["hidden"][:, :1], capacity=6)
    want_logits, want_hidden = head.draft_step(pairs, main["hidden"][:, 1:], cache, [1], [4])
    np.testing.assert_allclose(out["mtp_hidden"][0].numpy(), want_hidden[0], rtol=0, atol=SAME)
    assert int(out["draft"][0, 3]) == int(want_logits[0].argmax())


def test_draft_vocabulary_limits_drafts_not_tokens(session, monkeypatch):
    """QWEN35C_DRAFT_VOCAB=N: the joined head drafts among the first N ids only (its argmax over the
    head alone's first N logits), greedy decoding is unchanged, and verify's mtp check judges the
    drafts against the reference's argmax over the same N ids."""
    from qwen35c.backends.onnx.session import OnnxSession

    if not session.drafts:
        return
    monkeypatch.setenv("QWEN35C_DRAFT_VOCAB", "64")
    cut = OnnxSession(session.directory, session.manifest, graph="drafting")
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, session.config.vocab_size, (1, 40)))
    logits, out = cut.prefill(ids, cut.new_state(1, 40), extras=True)
    assert int(out["draft"].max()) < 64
    _, plain = session.prefill(ids, session.new_state(1, 40), extras=True)
    pairs = torch.cat([ids[:, 1:], logits[:, -1:].argmax(-1)], 1)
    head = session.draft_head()
    want, _ = head.draft_step(pairs, plain["hidden"], head.new_state(1, 40), [0], [40])
    assert int(out["draft"][0, -1]) == int(want[0, :64].argmax())
    prompts = [ids[0, :n].tolist() for n in (3, 40, 17)]
    assert cut.generate(prompts, 16, speculative=1, drafter="mtp").tokens == session.generate(prompts, 16).tokens
    from qwen35c.verify import verify_artifact

    report = verify_artifact(session.directory, prompts="short", skip=("speculative", "quantization"))
    assert {c["name"]: c["status"] for c in report["checks"]}["mtp"] == "pass" and "first 64 ids" in str(report)


def _fed(head, pairs, hidden, capacity=None):
    state = head.new_state(1, capacity or pairs.shape[1] + 1)
    head.draft_step(pairs, hidden, state, [0], [pairs.shape[1]])
    return state


@pytest.fixture(scope="module")
def bundled_artifact(tmp_path_factory):
    from qwen35c.models import bundled

    out = tmp_path_factory.mktemp("bundled") / "art"
    build_artifact(bundled("qwen35-tiny"), "cpu", out)
    return out


def test_trained_mtp_head_drafts_what_the_model_says(bundled_artifact, tmp_path):
    """The bundled model's trained head (drafter "mtp"): greedy output unchanged, and most first
    drafts accepted on code (held-out teacher-forced acceptance after distillation: 63.4%; these
    prompts: 52/69 at K = 1); an artifact built with
    --no-mtp has no head, drafts by prompt lookup and refuses "mtp" by name."""
    from qwen35c.models import bundled

    session = load(bundled_artifact)
    assert session.drafts and (bundled_artifact / "mtp.onnx").is_file()
    texts = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):",
             "for i in range(10):\n"]
    prompts = [session.tokenizer.encode(t).ids for t in texts]
    plain = session.generate(prompts, 32).tokens
    one = session.generate(prompts, 32, speculative=1, drafter="mtp")
    assert one.tokens == plain and one.acceptance > 0.6, one.acceptance
    assert session.generate(prompts, 32, speculative=3, drafter="mtp").tokens == plain
    out = tmp_path / "no-mtp"
    build_artifact(bundled("qwen35-tiny"), "cpu", out, mtp=False, check=False)
    bare = load(out)
    assert not bare.drafts and not (out / "mtp.onnx").exists()
    assert "hidden" not in bare.extra_outputs
    assert bare.generate(prompts, 16, speculative=2).tokens == [t[:16] for t in plain]
    with pytest.raises(QwenError, match="no MTP head"):
        bare.generate(prompts, 4, speculative=1, drafter="mtp")
    with pytest.raises(QwenError, match="unknown drafter"):
        bare.generate(prompts, 4, speculative=1, drafter="medusa")



def test_speculative_bench_on_the_bundled_model(bundled_artifact, tmp_path):
    """bench/bench_speculative.py end to end, small: several held-out prompts a round, per-round
    ratios to the round's plain run, the trained head's drafts counted over every prompt, and
    tokens equal to plain decoding's."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_speculative.py"
    proc = subprocess.run([sys.executable, str(script), str(bundled_artifact), "--context", "64", "--new", "12",
                           "--prompts", "3", "--k", "1", "--repeats", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())[0]
    assert result["prompt"].startswith("3 windows of 64 tokens")
    runs = {(g["drafter"], g["k"]): g for g in result["generation"]}
    assert set(runs) == {(None, 0), ("mtp", 1), ("lookup", 1)}
    for g in runs.values():
        assert g["equal_to_plain"] and len(g["ratios"]) == 2 and min(g["ratios"]) <= g["ratio"] <= max(g["ratios"])
    mtp = runs["mtp", 1]
    assert 0 < mtp["accepted"] <= mtp["drafted"] <= 3 * 11 and 1 < mtp["tokens_per_pass"] <= 2
    assert set(result["step_ratio"]) == {"1", "2", "3"} and result["step_ratio"]["1"] == 1.0

def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """p-value of Pearson's chi-square goodness of fit (cells with expected < 5 pooled): the
    chi-square survival function is the regularised upper incomplete gamma Q(dof / 2, stat / 2)."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_speculative_sampling_keeps_the_distribution(bundled_artifact):
    """2400 samples of two tokens (the second drafted and judged by the speculative rule, K = 1) against the
    model's exact joint p(t1) p(t2 | t1), with a point-mass drafter proposing the likeliest second
    token and a drafter with its own distribution q. Chi-square goodness of fit at significance
    0.001 (fixed seeds: the outcome is deterministic); a drafter that is always accepted must fail it.
    The bundled trained model: a random one's near-uniform distribution leaves no cell to test."""
    from qwen35c.runtime.generation import sampling_probs

    session = load(bundled_artifact)
    prompt, temperature, top_p = [11, 12, 13, 14], 0.7, 0.9
    first = sampling_probs(session.logits(torch.tensor([prompt]))[0, -1], temperature, top_p)
    first = first / first.sum()
    support = np.flatnonzero(first).tolist()
    rows = torch.tensor([prompt + [t] for t in support])
    second = sampling_probs(session.logits(rows)[:, -1], temperature, top_p)
    second = second / second.sum(-1, keepdims=True)
    expected_joint = first[support].reshape(-1, 1) * second          # [len(support), V]
    index = {t: i for i, t in enumerate(support)}

    class Likeliest:
        def propose(self, contexts, budgets):
            return [Draft([int(second[index[c[-1]]].argmax())] if k else []) for c, k in zip(contexts, budgets)]

    class Mixed:       # q = half the model's distribution, half uniform over the first 50 tokens
        def __init__(self):
            self.rng = np.random.default_rng(9)

        def propose(self, contexts, budgets):
            drafts = []
            for c, k in zip(contexts, budgets):
                if not k:
                    drafts.append(Draft([]))
                    continue
                q = 0.5 * second[index[c[-1]]].copy()
                q[:50] += 0.5 / 50
                drafts.append(Draft([int(self.rng.choice(q.size, p=q / q.sum()))], q.reshape(1, -1)))
            return drafts

    class Trusting(Likeliest):   # claims q(d) ~ 0: every draft is accepted (the rule is broken)
        def propose(self, contexts, budgets):
            drafts = super().propose(contexts, budgets)
            for d in drafts:
                d.probs = np.full((len(d.tokens), second.shape[1]), 1e-9)
            return drafts

    def p_value(drafter) -> float:
        """Also checks the test has power: enough cells of expected count >= 5."""
        counts = np.zeros(tuple(expected_joint.shape))
        for seed in range(12):
            result = session.generate([prompt] * 200, 3, temperature=temperature, top_p=top_p, seed=seed,
                                      speculative=1, drafter=drafter)
            for t1, t2, _ in result.tokens:   # t2: drafted then judged (t3 may be a bonus token)
                counts[index[t1], t2] += 1
        expected = expected_joint.ravel() * counts.sum()
        assert (expected >= 5).sum() >= 30
        return _chi_square_p(counts.ravel(), expected)

    assert p_value(Likeliest()) > 1e-3
    assert p_value(Mixed()) > 1e-3
    assert p_value(Trusting()) < 1e-3


def test_speculative_needs_a_commit_step(checkpoint_factory):
    from qwen35c.runtime.session import ReferenceSession

    reference = ReferenceSession.from_checkpoint(checkpoint_factory("tiny"))
    with pytest.raises(QwenError, match="commit"):
        reference.generate([[1, 2, 3]], 4, speculative=2)
    with pytest.raises(QwenError, match="at least 1"):
        reference.generate([[1, 2, 3]], 4, speculative=-1)


def test_prompt_lookup_drafts():
    lookup = PromptLookup()
    assert lookup.propose([[1, 2, 3, 9, 1, 2, 3]], [2])[0].tokens == [9, 1]
    assert lookup.propose([[5, 6, 7]], [3])[0].tokens == []
    assert lookup.propose([[4, 4, 4]], [0])[0].tokens == []
    with pytest.raises(QwenError):
        PromptLookup(0)


def test_verify_checks_speculative_decoding_and_catches_a_leaking_draft(session, monkeypatch):
    """verify's speculative check passes, and fails when drafts leak into the state (a verify step
    that ignores commit); `--skip speculative` reports it skipped."""
    from qwen35c.backends.onnx.session import OnnxSession
    from qwen35c.verify import verify_artifact

    def status(report):
        return {c["name"]: c["status"] for c in report["checks"]}["speculative"]

    assert status(verify_artifact(session.directory, prompts="short")) == "pass"
    assert status(verify_artifact(session.directory, prompts="short", skip=("speculative",))) == "skipped"
    extend = OnnxSession.extend

    def leaking(self, ids, state, lengths, commit, **kwargs):   # the states keep every token, positions stay right
        logits = extend(self, ids, state, lengths, lengths, **kwargs)
        state.q_start = state.q_start - (np.asarray(lengths) - np.asarray(commit))
        return logits

    monkeypatch.setattr(OnnxSession, "extend", leaking)
    report = verify_artifact(session.directory, prompts="short")
    assert status(report) == "fail" and report["status"] == "fail"


def test_run_speculative_cli(session):
    from click.testing import CliRunner

    from qwen35c.cli import main

    def run(*extra):
        result = CliRunner().invoke(main, ["run", str(session.directory), "--prompt-ids", "3,4,5,3,4,5,3,4",
                                           "--max-new-tokens", "16", "--ignore-eos", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    plain, spec = run(), run("--speculative", "3")
    assert spec["generated_ids"] == plain["generated_ids"] and spec["speculative"] == 3
    assert spec["decode_steps"] <= 15 and 0 <= spec["accepted"] <= spec["drafted"]
    if session.drafts:
        mtp = run("--speculative", "2", "--drafter", "mtp")
        assert mtp["generated_ids"] == plain["generated_ids"] and mtp["drafter"] == "mtp"


def test_verify_checks_the_mtp_head_and_catches_a_misaligned_one(session, monkeypatch):
    """verify's mtp check passes on the compiled head, fails when the head is fed hidden states one
    position off (the off-by-one a drafter can make: h_i paired with x_i instead of x_{i+1}), or
    when the joined graph is fed the same off-by-one, and `--skip mtp` reports it skipped."""
    from qwen35c.backends.onnx.session import OnnxSession
    from qwen35c.verify import verify_artifact

    if not session.drafts:
        return

    def status(report):
        return {c["name"]: c["status"] for c in report["checks"]}["mtp"]

    skip = ("speculative", "quantization")
    assert status(verify_artifact(session.directory, prompts="short", skip=skip)) == "pass"
    from click.testing import CliRunner

    from qwen35c.cli import main

    result = CliRunner().invoke(main, ["verify", str(session.directory), "--prompts", "short", "--json",
                                       "--skip", "speculative", "--skip", "mtp"])
    assert result.exit_code == 0, result.output
    assert status(json.loads(result.stdout)) == "skipped"
    step = OnnxSession.draft_step

    def misaligned(self, ids, hidden, state, q_start, lengths):
        hidden = np.asarray(hidden)
        return step(self, ids, np.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1), state, q_start, lengths)

    monkeypatch.setattr(OnnxSession, "draft_step", misaligned)
    report = verify_artifact(session.directory, prompts="short", skip=skip)
    assert status(report) == "fail" and report["status"] == "fail"
    monkeypatch.undo()
    from qwen35c.backends.onnx import session as onnx_session

    following = onnx_session._following

    def current(ids, lengths, judged):   # the joined head reads each position's own token, not the next
        return following(np.concatenate([ids[:, :1], ids[:, :-1]], axis=1), lengths, judged)

    monkeypatch.setattr(onnx_session, "_following", current)
    report = verify_artifact(session.directory, prompts="short", skip=skip)
    assert status(report) == "fail" and report["mtp"]["max_abs_joined_hidden"] > 1e-3
