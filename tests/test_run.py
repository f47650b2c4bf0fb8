"""`qwen35c run` and the reference session: greedy and sampled generation, logits, batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from click.testing import CliRunner

from qwen35c.cli import main
from qwen35c.runtime import load

PROMPT = [5, 17, 300, 42, 9, 77]


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist(), ids


def test_run_greedy_json_and_logits(checkpoint_factory, tmp_path):
    path = checkpoint_factory("tiny-moe")
    out = tmp_path / "logits.npy"
    result = _invoke("run", path, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 7,
                     "--ignore-eos", "--json", "--save-logits", out)
    payload = json.loads(result.stdout)
    session = load(path)
    expected, full_ids = _greedy(session.model, PROMPT, 7)
    assert payload["generated_ids"] == expected
    assert payload["decode_tokens_per_second"] > 0
    logits = np.load(out)
    assert logits.shape == (len(PROMPT) + 7, session.config.vocab_size) and logits.dtype == np.float32
    with torch.no_grad():
        reference = session.model(full_ids)[0].numpy()
    assert np.abs(logits - reference).max() <= 1e-4


def test_prefill_only(checkpoint_factory, tmp_path):
    out = tmp_path / "p.npy"
    result = _invoke("run", checkpoint_factory("tiny"), "--prompt-ids", "1,2,3", "--max-new-tokens", 0,
                     "--json", "--save-logits", out)
    assert json.loads(result.stdout)["generated_ids"] == []
    assert np.load(out).shape == (3, 512)


def test_sampling_is_seeded(checkpoint_factory):
    session = load(checkpoint_factory("tiny"))
    runs = [session.generate([PROMPT], 12, temperature=1.0, top_p=0.9, seed=s).tokens[0] for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_batch_generation_equals_rows_alone(checkpoint_factory):
    session = load(checkpoint_factory("tiny-next"))
    prompts = [PROMPT, PROMPT[:2], list(range(1, 70))]
    together = session.generate(prompts, 6).tokens
    alone = [session.generate([p], 6).tokens[0] for p in prompts]
    assert together == alone


def test_stops_at_eos(checkpoint_factory):
    session = load(checkpoint_factory("tiny"))
    first = session.generate([PROMPT], 1).tokens[0][0]
    assert session.generate([PROMPT], 10, stop_ids=(first,)).tokens[0] == [first]


def test_text_prompt_with_tokenizer(checkpoint_factory, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    path = tmp_path / "with_tok"
    shutil.copytree(checkpoint_factory("tiny"), path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def fibonacci(n):\n    return n\n"] * 20, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    result = _invoke("run", path, "--prompt", "def fibonacci(n):", "--max-new-tokens", 4, "--ignore-eos")
    assert result.stdout.startswith("def fibonacci(n):")
    assert "tok/s" in result.stderr


def test_bad_options_exit_2(checkpoint_factory):
    runner = CliRunner()
    path = str(checkpoint_factory("tiny"))
    for args in (["--prompt-ids", "1,x"], ["--prompt-ids", "99999"], [], ["--prompt", "hi"]):
        result = runner.invoke(main, ["run", path, *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def _nucleus_twin(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus by a full sort of the row (the naive twin of generation._nucleus)."""
    order = np.argsort(-probs)
    ranked = probs[order]
    out = np.zeros_like(probs)
    kept = order[np.cumsum(ranked) - ranked < top_p]
    out[kept] = probs[kept]
    return out


def test_sampling_probs_nucleus_equals_a_full_sort():
    """The nucleus found among the 1024 (16384) likeliest tokens equals the full sort's: peaked rows
    (the first shortcut), rows of 20000 tokens whose nucleus needs more than 1024 (the second) or
    more than 16384 (the whole row), a vocabulary under 1024, and top_p near 1."""
    from qwen35c.runtime.generation import sampling_probs

    rng = np.random.default_rng(0)
    for vocab, scale in ((20000, 8.0), (20000, 1.0), (20000, 0.05), (300, 3.0)):
        logits = (rng.standard_normal((4, vocab)) * scale).astype(np.float32)
        for top_p in (0.5, 0.9, 0.999):
            got = sampling_probs(logits, 0.8, top_p)
            full = sampling_probs(logits, 0.8, 1.0)
            want = np.stack([_nucleus_twin(row, top_p) for row in full])
            assert np.array_equal(got, want), (vocab, scale, top_p)
            assert (np.count_nonzero(got, -1) >= 1).all()


def test_sample_draws_the_distribution_and_never_a_zero():
    """Inverse-CDF sampling: 40000 draws of a 6-token distribution with two zeros (one first, where
    a draw of exactly 0 would land) match it within 4 standard deviations; zeros are never drawn."""
    from qwen35c.runtime.generation import sample

    probs = np.array([0.0, 0.1, 0.0, 0.2, 0.3, 0.4]) * 3.0      # unnormalised, as sampling_probs gives
    draws = sample(np.broadcast_to(probs, (40000, 6)), np.random.default_rng(1))
    counts = np.bincount(draws, minlength=6)
    p = probs / probs.sum()
    assert counts[0] == counts[2] == 0
    assert (np.abs(counts - 40000 * p) <= 4 * np.sqrt(40000 * p * (1 - p)) + 1e-9).all(), counts


def test_generating_from_an_onnx_artifact_imports_no_torch(tmp_path):
    """`qwen35c run` on an onnx artifact (greedy, sampled, speculative with the MTP head) with torch
    made unimportable: the runtime is numpy and ONNX Runtime only (~220 MB less resident)."""
    import subprocess
    import sys
    import textwrap

    from qwen35c.build import build_artifact
    from qwen35c.models import bundled

    art = tmp_path / "art"
    build_artifact(bundled("qwen35-tiny"), "cpu", art, check=False)
    script = textwrap.dedent("""
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is not for the onnx runtime")

        sys.meta_path.insert(0, NoTorch())
        from qwen35c.cli import main
        main(sys.argv[1:])
    """)
    for extra in ([], ["--temperature", "0.8", "--top-p", "0.9", "--speculative", "2"],
                  ["--speculative", "2", "--drafter", "mtp"]):
        run = subprocess.run([sys.executable, "-c", script, "run", str(art), "--prompt", "def f(x):",
                              "--max-new-tokens", "6", "--json", *extra], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert len(json.loads(run.stdout)["generated_ids"]) == 6
