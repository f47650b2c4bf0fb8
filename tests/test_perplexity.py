"""`qwen35c perplexity` and qwen35c.eval.perplexity: windowing, metrics, saved logits and KL."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qwen35c.errors import QwenError
from qwen35c.eval import perplexity as ppl

# A small held-out file of the bundled models (tools/train_tiny.py HELD_OUT), present in every
# CPython. The bound is ~15% above the bits/byte the bundled dense model scored when it was trained
# (see qwen35c/models/qwen35-tiny/training.json): a broken loader or tokenizer lands far above it.
HELDOUT_FILE = Path(sysconfig.get_paths()["stdlib"]) / "bisect.py"
MAX_BITS_PER_BYTE = 2.05  # bisect.py scored 1.792 (training.json, bits_per_byte_per_file)


# ---- windows -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,context,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (9, 8, 8), (100, 16, 7)])
def test_windows_score_each_target_once_within_context(n, context, stride):
    seen = []
    for w in ppl.windows(n, context, stride):
        assert 0 < w.end - w.begin <= context
        assert w.begin <= w.target_begin - 1 and w.target_end - 1 == w.end
        assert w.target_end - w.target_begin <= stride
        # every target sees at least context - stride tokens (or all tokens before it)
        assert w.target_begin - w.begin >= min(w.target_begin, context - stride + 1)
        seen += range(w.target_begin, w.target_end)
    assert seen == list(range(1, n))


@pytest.mark.parametrize("context,stride", [(0, None), (4, 5), (4, 0)])
def test_bad_windows_are_user_errors(context, stride):
    with pytest.raises(QwenError):
        list(ppl.windows(10, context, stride if stride is not None else 1))


# ---- metrics with synthetic models -----------------------------------------------------------------
V = 37


def uniform_fn(ids):
    return torch.zeros(1, ids.shape[1], V)


def bigram_fn(seed=0, noise=0.0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=gen) * 3
    if noise:
        table = table + noise * torch.randn(V, V, generator=torch.Generator().manual_seed(seed + 1))
    calls = []

    def fn(ids):
        calls.append(ids.shape[1])
        return table[ids]
    fn.calls = calls
    return fn


def test_uniform_model_has_perplexity_vocab():
    ids = list(range(V)) * 3
    r = ppl.evaluate(uniform_fn, ids, n_bytes=200, context=16)
    assert r["tokens"] == len(ids) - 1
    assert r["nll_mean"] == pytest.approx(math.log(V))
    assert r["perplexity"] == pytest.approx(V)
    assert r["bits_per_byte"] == pytest.approx((len(ids) - 1) * math.log2(V) / 200)
    assert (r["context"], r["stride"]) == (16, 16)


def test_window_lengths_respect_context():
    fn = bigram_fn()
    ppl.evaluate(fn, [i % V for i in range(100)], context=16, stride=5)
    assert max(fn.calls) <= 16


def test_bigram_nll_does_not_depend_on_windowing():
    fn = bigram_fn()
    ids = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    a = ppl.evaluate(fn, ids, context=200)
    b = ppl.evaluate(fn, ids, context=7, stride=3)
    assert a["nll_mean"] == pytest.approx(b["nll_mean"], rel=1e-6)


@pytest.mark.parametrize("top_k", [0, 5, ppl.DEFAULT_TOP_K])
def test_kl_against_itself_is_zero_and_against_a_perturbed_model_positive(tmp_path, top_k):
    ids = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    base = tmp_path / "base.safetensors"
    ppl.evaluate(bigram_fn(), ids, context=32, save_logits=base, top_k=top_k)
    same = ppl.evaluate(bigram_fn(), ids, kl_base=base)  # context/stride taken from the file
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-7) and same["kl_max"] < 1e-6
    assert same["top1_agreement"] == 1.0
    other = ppl.evaluate(bigram_fn(noise=2.0), ids, kl_base=base)
    assert other["kl_mean"] > 1e-2 and other["kl_p99"] <= other["kl_max"]
    assert 0.0 < other["top1_agreement"] < 1.0


def test_topk_kl_is_a_close_lower_bound_of_the_full_kl(tmp_path):
    ids = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    full, top = tmp_path / "full.safetensors", tmp_path / "top.safetensors"
    ppl.evaluate(bigram_fn(), ids, context=32, save_logits=full, top_k=0)
    ppl.evaluate(bigram_fn(), ids, context=32, save_logits=top, top_k=8)
    exact = ppl.evaluate(bigram_fn(noise=0.5), ids, kl_base=full)["kl_mean"]
    approx = ppl.evaluate(bigram_fn(noise=0.5), ids, kl_base=top)["kl_mean"]
    assert approx <= exact + 1e-6 and approx > 0.5 * exact


def test_kl_base_mismatches_are_user_errors(tmp_path):
    ids = list(range(V)) * 4
    base = tmp_path / "base.safetensors"
    ppl.evaluate(bigram_fn(), ids, context=16, save_logits=base)
    with pytest.raises(QwenError, match="different text"):
        ppl.evaluate(bigram_fn(), ids[:-1], kl_base=base)
    with pytest.raises(QwenError, match="--context 16"):
        ppl.evaluate(bigram_fn(), ids, context=32, kl_base=base)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(QwenError, match="junk.safetensors"):
        ppl.evaluate(bigram_fn(), ids, kl_base=junk)


def test_wrong_logits_shape_is_reported():
    with pytest.raises(QwenError, match="shape"):
        ppl.evaluate(lambda ids: torch.zeros(ids.shape[1], V), list(range(10)))


# ---- the command on the bundled model ------------------------------------------------------------
def cli(*args):
    from qwen35c.cli import main

    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "bisect.py"
    path.write_bytes(HELDOUT_FILE.read_bytes())
    return path


def test_cli_json_default_model_heldout_threshold(small_text, tmp_path):
    logits = tmp_path / "base.safetensors"
    res = cli("perplexity", "--text", str(small_text), "--json", "--save-logits", str(logits))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("tokens", "nll_mean", "perplexity", "bits_per_byte"):
        assert key in out
    assert out["model"].endswith("qwen35-tiny")
    assert out["tokens"] > 500
    assert out["bits_per_byte"] < MAX_BITS_PER_BYTE, out
    assert logits.stat().st_size < 200 * out["tokens"] * ppl.DEFAULT_TOP_K // 8

    res = cli("perplexity", "qwen35-tiny", "--text", str(small_text), "--json", "--kl-base", str(logits))
    assert res.exit_code == 0, res.output
    kl = json.loads(res.stdout)
    assert kl["kl_mean"] == pytest.approx(0.0, abs=1e-6) and kl["kl_max"] < 1e-5
    assert kl["top1_agreement"] == 1.0
    assert kl["nll_mean"] == pytest.approx(out["nll_mean"], rel=1e-6)


def test_cli_human_output(small_text):
    res = cli("perplexity", "--text", str(small_text), "--context", "128")
    assert res.exit_code == 0, res.output
    assert "bits_per_byte" in res.stdout and "context 128" in res.stdout


@pytest.mark.parametrize("make", ["missing", "dir", "binary"])
def test_cli_bad_text_is_one_line_exit_2(tmp_path, make):
    path = tmp_path / "in.txt"
    if make == "dir":
        path.mkdir()
    elif make == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    res = cli("perplexity", "--text", str(path))
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in res.output


def test_cli_bad_model_dir_is_one_line_exit_2(tmp_path, small_text):
    res = cli("perplexity", str(tmp_path / "nope"), "--text", str(small_text))
    assert res.exit_code == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "nope" in res.stderr
