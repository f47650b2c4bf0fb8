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
