"""The ONNX backend against the reference model: tiny dense, MoE and Qwen3-Next presets, prefill at
lengths around the 64-token chunk, prefill + 8 decode steps, and a batch of different lengths."""

from __future__ import annotations

import onnx
import pytest
import torch

from qwen35c.build import build_artifact
from qwen35c.errors import QwenError
from qwen35c.runtime import load
from reference.checkpoint import load_model

TOL = 3e-6       # artifact vs reference; measured worst 3.0e-7 over these tests (1 and 2 threads)
SAME = 1e-6      # the artifact against itself run another way; measured worst 8.9e-8 (mostly 0)


@pytest.fixture(scope="module", params=["tiny", "tiny-moe", "tiny-next"])
def built(request, checkpoint_factory, tmp_path_factory):
    ckpt = checkpoint_factory(request.param)
    out = tmp_path_factory.mktemp("art") / request.param
    build_artifact(ckpt, "cpu", out)
    return load(out), load_model(ckpt, torch.float32)


def test_prefill_lengths(built):
    session, ref = built
    gen = torch.Generator().manual_seed(1)
    for length in (1, 63, 64, 65, 130):
        ids = torch.randint(0, ref.config.vocab_size, (1, length), generator=gen)
        with torch.no_grad():
            want = ref(ids)
        got = session.logits(ids)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOL, length


def test_batch_prefill_then_decode(built):
    session, ref = built
    lengths = [5, 64, 33]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, ref.config.vocab_size, (3, max(lengths)), generator=gen)
    state, cache = session.new_state(3, 80), ref.new_cache(3, 80)
    buffers = [id(v) for bufs in state.buffers for v in bufs.values()]
    lens = torch.tensor(lengths)
    got, want = session.prefill(ids, state, lens), ref(ids, cache, lens)
    for b, n in enumerate(lengths):
        assert (got[b, :n] - want[b, :n]).abs().max() <= TOL
    nxt = torch.stack([want[b, n - 1] for b, n in enumerate(lengths)]).argmax(-1)
    for _ in range(8):
        got, want = session.decode(nxt.view(3, 1), state), ref(nxt.view(3, 1), cache)
        assert got.shape == (3, 1, ref.config.vocab_size)
        assert (got - want).abs().max() <= TOL
        nxt = want[:, 0].argmax(-1)
    # the session reuses its two buffer sets: no state tensor was reallocated
    assert [id(v) for bufs in state.buffers for v in bufs.values()] == buffers


def count_runs(session, monkeypatch) -> list:
    """Record the [B, T] of each graph run the session makes for the rest of the test."""
    runs, run = [], session._run
    monkeypatch.setattr(session, "_run", lambda ids, *rest, **named: runs.append(ids.shape) or run(ids, *rest, **named))
    return runs


def test_batch_continuation(built, monkeypatch):
    """A second prompt on top of a batched cache (ORT's CPU GQA takes that only for batch 1: the
    session runs it row by row over the same buffers), then decoding: all match the reference."""
    session, ref = built
    gen = torch.Generator().manual_seed(5)
    first, second = torch.tensor([5, 64, 33]), torch.tensor([7, 1, 20])
    state, cache = session.new_state(3, 100), ref.new_cache(3, 100)
    ids = torch.randint(0, ref.config.vocab_size, (3, 64), generator=gen)
    session.prefill(ids, state, first)
    ref(ids, cache, first)
    ids = torch.randint(0, ref.config.vocab_size, (3, 20), generator=gen)
    runs = count_runs(session, monkeypatch)
    got, want = session.prefill(ids, state, second), ref(ids, cache, second)
    assert len(runs) == 3   # one run a row, not one a token
    for b, n in enumerate(second.tolist()):
        assert (got[b, :n] - want[b, :n]).abs().max() <= TOL
    last = session.prefill(ids, session.new_state(3, 20), second, last_only=True)
    assert last.shape == (3, 1, ref.config.vocab_size)
    nxt = torch.stack([want[b, n - 1] for b, n in enumerate(second.tolist())]).argmax(-1).view(3, 1)
    for _ in range(3):
        got, want = session.decode(nxt, state), ref(nxt, cache)
        assert (got - want).abs().max() <= TOL
        nxt = want[:, 0].argmax(-1).view(3, 1)


def test_bad_lengths(built):
    session, _ref = built
    ids = torch.zeros(2, 8, dtype=torch.long)
    for lengths in ([8, 9], [8, -1], [8]):
        with pytest.raises(QwenError, match="lengths"):
            session.prefill(ids, session.new_state(2, 16), torch.tensor(lengths))


def test_batch_prompt_longer_than_chunk(built, monkeypatch):
    """A batched prompt longer than QWEN35C_PREFILL_CHUNK runs row by row in chunks: the same
    logits and state as the batch run whole."""
    session, _ref = built
    ids = torch.randint(0, session.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    lens = torch.tensor([40, 17])
    whole_state = session.new_state(2, 48)
    whole = session.prefill(ids, whole_state, lens)
    monkeypatch.setenv("QWEN35C_PREFILL_CHUNK", "16")
    state = session.new_state(2, 48)
    runs = count_runs(session, monkeypatch)
    rows = session.prefill(ids, state, lens)
    assert runs == [(1, 16), (1, 16), (1, 8), (1, 16), (1, 1)]
    for b, n in enumerate(lens.tolist()):
        assert (rows[b, :n] - whole[b, :n]).abs().max() <= SAME
    nxt = torch.tensor([[3], [4]])
    assert (session.decode(nxt, state) - session.decode(nxt, whole_state)).abs().max() <= SAME


def test_no_cancelling_layout_ops(built):
    """simplify.py left no Transpose (the IR's [B, h, T, hd] attention layout cancels against the
    packed kernels) and no Reshape of a Reshape."""
    session, _ref = built
    graph = onnx.load(session.directory / session.manifest["backend"]["model"], load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    assert "Transpose" not in {n.op_type for n in graph.node}
    for n in graph.node:
        if n.op_type == "Reshape" and n.input[0] in producer:
            assert producer[n.input[0]].op_type != "Reshape", n.name


def test_last_only_and_batch_equals_alone(built):
    session, _ref = built
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, session.config.vocab_size, (2, 40), generator=gen)
    lens = torch.tensor([40, 17])
    full = session.prefill(ids, session.new_state(2, 41), lens)
    last = session.prefill(ids, session.new_state(2, 41), lens, last_only=True)
    assert last.shape == (2, 1, session.config.vocab_size)
    assert torch.allclose(last[0, 0], full[0, 39], atol=1e-6) and torch.allclose(last[1, 0], full[1, 16], atol=1e-6)
    alone = session.logits(ids[1:, :17])
    assert (alone[0] - full[1, :17]).abs().max() <= SAME


def test_chunked_prefill_equals_whole(built, monkeypatch):
    """A prompt longer than QWEN35C_PREFILL_CHUNK runs as consecutive chunks continuing from
    q_start (chunk boundaries at 16 and 32 cut the 64-token GDN chunk and the attention window);
    logits and the state it leaves match the prompt run whole, and decoding goes on from it."""
    session, ref = built
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, session.config.vocab_size, (1, 40), generator=gen)
    whole_state = session.new_state(1, 48)
    whole = session.prefill(ids, whole_state)
    monkeypatch.setenv("QWEN35C_PREFILL_CHUNK", "16")
    state = session.new_state(1, 48)
    chunked = session.prefill(ids, state)
    assert (chunked - whole).abs().max() <= SAME
    last = session.prefill(ids, session.new_state(1, 48), last_only=True)
    assert (last[0, 0] - whole[0, 39]).abs().max() <= SAME
    nxt = whole[:, -1].argmax(-1).view(1, 1)
    assert (session.decode(nxt, state) - session.decode(nxt, whole_state)).abs().max() <= SAME
    monkeypatch.setenv("QWEN35C_PREFILL_CHUNK", "zero")
    with pytest.raises(QwenError, match="QWEN35C_PREFILL_CHUNK"):
        session.prefill(ids, session.new_state(1, 48))


def test_generate_greedy_and_sampling(built):
    session, ref = built
    from qwen35c.runtime.session import ReferenceSession

    reference = ReferenceSession(ref)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert session.generate(prompts, 6).tokens == reference.generate(prompts, 6).tokens
    a = session.generate(prompts, 6, temperature=0.8, top_p=0.9, seed=5).tokens
    b = session.generate(prompts, 6, temperature=0.8, top_p=0.9, seed=5).tokens
    assert a == b and all(len(row) == 6 for row in a)
