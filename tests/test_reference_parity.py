"""The reference model against Hugging Face transformers 5.24: the ground truth's own proof."""

from __future__ import annotations

import pytest
import torch

from reference.checkpoint import load_model

PRESETS = ["tiny", "tiny-moe", "tiny-next"]
LENGTHS = [1, 63, 64, 65, 130]


def _ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset, ratio", [("tiny", 1), ("tiny", 2), ("tiny", 3), ("tiny-moe", 2), ("tiny-next", 3)])
def test_fp32_logits_match_hf(checkpoint_factory, hf_model, preset, ratio):
    """fp32 max |dlogit| <= 4e-6 at lengths around the chunk size, for value/key head ratios 1, 2, 3."""
    path = checkpoint_factory(preset, linear_num_key_heads=2, linear_num_value_heads=2 * ratio)
    ours, theirs = load_model(path), hf_model(path)
    for length in LENGTHS:
        ids = _ids(2, length, ours.config.vocab_size, length)
        with torch.no_grad():
            diff = (ours(ids) - theirs(ids).logits).abs().max().item()
        # measured worst 3.6e-7 over the grid (1 and 2 threads)
        assert diff <= 4e-6, f"{preset} r={ratio} T={length}: max |dlogit| = {diff:.3g}"


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_then_decode_equals_full_forward(checkpoint_factory, hf_model, preset):
    """Prefill 65 tokens, then decode 8 one at a time: logits equal the full forward's (and HF's)."""
    path = checkpoint_factory(preset)
    model = load_model(path)
    ids = _ids(2, 73, model.config.vocab_size, 7)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 80)
        steps = [model(ids[:, :65], cache)]
        steps += [model(ids[:, t:t + 1], cache) for t in range(65, 73)]
        hf_full = hf_model(path)(ids).logits
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 3e-6      # measured worst 2.4e-7
    assert (incremental - hf_full).abs().max().item() <= 3e-6   # measured worst 2.7e-7
    assert cache.seq_lens.tolist() == [73, 73]


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_with_different_lengths_equals_rows_alone(checkpoint_factory, preset):
    """Right-padded rows of lengths 5, 64, 70 give each row's own logits, in prefill and in decode;
    the padding garbage never reaches the state."""
    path = checkpoint_factory(preset)
    model = load_model(path)
    vocab = model.config.vocab_size
    lengths = [5, 64, 70]
    rows = [_ids(1, n + 3, vocab, 100 + n) for n in lengths]
    padded = torch.full((3, 70), 7, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        padded[b, :n] = row[0, :n]
    with torch.no_grad():
        cache = model.new_cache(3, 80)
        prefill = model(padded, cache, lengths=torch.tensor(lengths))
        decode = [model(torch.stack([r[0, n + t] for r, n in zip(rows, lengths)]).view(3, 1), cache)
                  for t in range(3)]
        for b, (row, n) in enumerate(zip(rows, lengths)):
            alone = model(row)
            assert (prefill[b, :n] - alone[0, :n]).abs().max().item() <= 2e-6, f"row {b} prefill"  # worst 1.8e-7
            got = torch.cat([d[b] for d in decode])
            assert (got - alone[0, n:n + 3]).abs().max().item() <= 3e-6, f"row {b} decode"  # worst 2.1e-7


def test_chunked_and_recurrent_delta_rule_agree():
    """The two fp32 forms of the delta rule agree, with grouped value heads and a non-zero state."""
    from reference import ops

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 130, 2, 16, generator=gen), torch.randn(2, 130, 2, 16, generator=gen)
    v = torch.randn(2, 130, 6, 8, generator=gen)
    g = -torch.rand(2, 130, 6, generator=gen) * 2
    beta = torch.rand(2, 130, 6, generator=gen)
    state = torch.randn(2, 6, 16, 8, generator=gen)
    o1, s1 = ops.chunk_gated_delta_rule(q, k, v, g, beta, state)
    o2, s2 = ops.recurrent_gated_delta_rule(q, k, v, g, beta, state)
    assert (o1 - o2).abs().max().item() < 5e-6   # measured 4.8e-7
    assert (s1 - s2).abs().max().item() < 7e-6   # measured 7.0e-7


def test_bf16_close_to_hf_with_identical_greedy_tokens(checkpoint_factory, hf_model):
    """bf16 on the dense model: within a few bf16 ulps of HF, and the same greedy continuation."""
    path = checkpoint_factory("tiny")
    ours, theirs = load_model(path, dtype=torch.bfloat16), hf_model(path, dtype=torch.bfloat16)
    ids = _ids(1, 40, ours.config.vocab_size, 3)
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
        ulp = 2.0 ** (torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)
        assert ((a - b).abs() / ulp).max().item() <= 4, "more than 4 bf16 ulps from HF"
        ours_ids, theirs_ids = ids, ids
        for _ in range(10):
            ours_ids = torch.cat([ours_ids, ours(ours_ids)[:, -1:].argmax(-1)], dim=1)
            theirs_ids = torch.cat([theirs_ids, theirs(theirs_ids).logits[:, -1:].argmax(-1)], dim=1)
    assert ours_ids.tolist() == theirs_ids.tolist()


def test_layouts_load_to_identical_parameters(checkpoint_factory):
    """VLM vs text-only prefixes and fused vs per-expert experts give identical parameters."""
    states = []
    for layout, experts in [("vlm", "fused"), ("text", "fused"), ("vlm", "per_expert"), ("text", "per_expert")]:
        model = load_model(checkpoint_factory("tiny-moe", layout=layout, experts=experts))
        states.append(model.state_dict())
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for name, tensor in states[0].items():
            assert torch.equal(tensor, other[name]), name


def test_mtp_module_loads_and_runs(checkpoint_factory):
    """The MTP head is loaded from mtp.* and drafts logits of the right shape from real hidden states."""
    model = load_model(checkpoint_factory("tiny"))
    assert model.mtp is not None
    ids = _ids(1, 12, model.config.vocab_size, 5)
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        embeds = model.model.embed_tokens(ids[:, 1:])
        positions = torch.arange(1, 12).unsqueeze(0)
        draft = model.lm_head(model.mtp(hidden[:, :-1], embeds, positions))
    assert draft.shape == (1, 11, model.config.vocab_size)
    assert torch.isfinite(draft).all()
