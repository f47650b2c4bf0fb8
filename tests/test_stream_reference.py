"""The streamed reference (`reference.stream.StreamedModel`) computes the resident reference's logits
bit for bit — full sequences, a prompt set in one pass, prefill + decode with state, batches of
different lengths — while holding one decoder layer at a time."""

from __future__ import annotations

import pytest
import torch

from reference.checkpoint import load_model
from reference.stream import Batch, StreamedModel


@pytest.mark.parametrize("preset,layout,experts", [("tiny", "vlm", "fused"), ("tiny-moe", "text", "per_expert"),
                                                   ("tiny-next", "text", "fused")])
def test_streamed_logits_equal_the_resident_reference(checkpoint_factory, preset, layout, experts):
    path = checkpoint_factory(preset, layout=layout, experts=experts)
    resident, streamed = load_model(path), StreamedModel(path)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, resident.config.vocab_size, (1, 65), generator=gen)
    b = torch.randint(0, resident.config.vocab_size, (3, 9), generator=gen)
    lengths = torch.tensor([3, 9, 5])
    with torch.no_grad():
        want = [resident(a), resident(b, lengths=lengths)]
    got = streamed.forward_many([Batch(a), Batch(b, lengths=lengths)])       # one pass, both batches
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_streamed_prefill_and_decode_equal_the_resident_reference(checkpoint_factory):
    path = checkpoint_factory("tiny")
    resident, streamed = load_model(path), StreamedModel(path)
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([3, 9, 5])
    cr, cs = resident.new_cache(3, 16), streamed.new_cache(3, 16)
    with torch.no_grad():
        assert torch.equal(streamed(ids, cs, lengths, last_only=True), resident(ids, cr, lengths, last_only=True))
        for step in range(3):
            nxt = torch.full((3, 1), 7 + step)
            assert torch.equal(streamed(nxt, cs), resident(nxt, cr))
    assert torch.equal(cs.seq_lens, cr.seq_lens)
    assert all(torch.equal(cs.recurrent[i], cr.recurrent[i]) for i in cr.recurrent)


def test_streamed_reference_holds_one_layer(checkpoint_factory, monkeypatch):
    """Layers are loaded in order, one at a time, and dropped before the next is loaded."""
    import gc
    import weakref

    path = checkpoint_factory("tiny")
    streamed = StreamedModel(path)
    alive, loaded = [], []
    original = streamed.load_layer

    def spy(index):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))
        layer = original(index)
        loaded.append(weakref.ref(layer))
        return layer

    monkeypatch.setattr(streamed, "load_layer", spy)
    streamed(torch.zeros(1, 4, dtype=torch.long))
    assert alive == [0] * streamed.config.num_hidden_layers
