"""Checkpoint I/O: bad input gets one clear line and exit code 2; good input round-trips."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner

from qwen35c.cli import main
from reference.checkpoint import Checkpoint, load_model
from reference.config import Qwen35Config, load_config


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _broken(checkpoint_factory, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(checkpoint_factory("tiny"), path)
    return path


def _assert_clean_failure(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qwen35c: error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_malformed_json(checkpoint_factory, tmp_path):
    path = _broken(checkpoint_factory, tmp_path, "badjson")
    (path / "config.json").write_text('{"model_type": "qwen3_5",')
    _assert_clean_failure(_run("run", str(path), "--prompt-ids", "1"), "config.json", "malformed JSON")


def test_unknown_model_type(checkpoint_factory, tmp_path):
    path = _broken(checkpoint_factory, tmp_path, "badtype")
    raw = json.loads((path / "config.json").read_text())
    raw["model_type"] = raw["text_config"]["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(raw))
    _assert_clean_failure(_run("inspect", str(path)), "unknown model_type 'llama'")


def test_missing_tensor(checkpoint_factory, tmp_path):
    path = _broken(checkpoint_factory, tmp_path, "missing")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    del tensors["model.language_model.layers.1.linear_attn.A_log"]
    save_file(tensors, path / "model.safetensors")
    _assert_clean_failure(_run("run", str(path), "--prompt-ids", "1"), "model.language_model.layers.1.linear_attn.A_log")


def test_wrong_shape(checkpoint_factory, tmp_path):
    path = _broken(checkpoint_factory, tmp_path, "shape")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    name = "model.language_model.layers.3.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, path / "model.safetensors")
    _assert_clean_failure(_run("run", str(path), "--prompt-ids", "1"), name, "expected [64, 64]")


def test_truncated_safetensors(checkpoint_factory, tmp_path):
    path = _broken(checkpoint_factory, tmp_path, "truncated")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    _assert_clean_failure(_run("run", str(path), "--prompt-ids", "1"), "model.safetensors", "truncated")


def test_corrupt_header(checkpoint_factory, tmp_path):
    path = _broken(checkpoint_factory, tmp_path, "corrupt")
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    file.write_bytes(bytes(data))
    _assert_clean_failure(_run("inspect", str(path)), "model.safetensors", "corrupt safetensors header")


def test_pickle_only_checkpoint_is_refused(checkpoint_factory, tmp_path):
    path = _broken(checkpoint_factory, tmp_path, "pickle")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    _assert_clean_failure(_run("run", str(path), "--prompt-ids", "1"), "pytorch_model.bin", "never loads pickle")


def test_not_a_directory_and_missing_directory(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    _assert_clean_failure(_run("inspect", str(file)), str(file))
    _assert_clean_failure(_run("inspect", str(tmp_path / "absent")), "absent")


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path / "absent")])
    assert result.exit_code != 0 and result.exception is not None


def test_config_spellings():
    """Nested or flat, layer_types or full_attention_interval, rope_parameters or top-level rope keys."""
    base = Qwen35Config(num_hidden_layers=8, vocab_size=100)
    nested = base.to_hf_dict("vlm")
    flat = base.to_hf_dict("text")
    assert Qwen35Config.from_dict(nested) == Qwen35Config.from_dict(flat) == base
    old = dict(flat)
    old.pop("layer_types")
    old["full_attention_interval"] = 4
    rope = old.pop("rope_parameters")
    old["rope_theta"], old["partial_rotary_factor"] = rope["rope_theta"], rope["partial_rotary_factor"]
    assert Qwen35Config.from_dict(old) == base
    missing_theta = dict(flat, rope_parameters={"rope_type": "default"})
    with pytest.raises(Exception, match="rope_theta"):
        Qwen35Config.from_dict(missing_theta)


def test_top_level_tie_flag_ties_lm_head():
    """The VLM's top-level tie flag ties lm_head even when text_config lacks it (notes' loader gotcha)."""
    raw = Qwen35Config(num_hidden_layers=4, vocab_size=100, tie_word_embeddings=True).to_hf_dict("vlm")
    raw["text_config"].pop("tie_word_embeddings")
    assert Qwen35Config.from_dict(raw).tie_word_embeddings


def test_our_files_read_by_safetensors_library(checkpoint_factory):
    from safetensors import safe_open

    path = checkpoint_factory("tiny-moe")
    ckpt = Checkpoint(path)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(ckpt.names())
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), ckpt.view(name))
    ckpt.close()


def test_sharded_checkpoint_loads(checkpoint_factory, tmp_path):
    from reference.checkpoint import save_checkpoint

    model = load_model(checkpoint_factory("tiny"))
    out = save_checkpoint(model, tmp_path / "sharded", dtype=torch.float32, shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = load_model(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert load_config(out) == model.config


def test_make_checkpoint_cli(tmp_path):
    result = _run("make-checkpoint", "--preset", "tiny-next", "--seed", "3", "-o", str(tmp_path / "n"))
    assert result.exit_code == 0, result.output
    names = Checkpoint(tmp_path / "n").names()
    assert any(n.endswith("in_proj_qkvz.weight") for n in names)
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)
    again = _run("make-checkpoint", "--preset", "tiny", "-o", str(tmp_path / "n"))
    assert again.exit_code == 2 and "not empty" in again.output
    bad = _run("make-checkpoint", "--preset", "nope", "-o", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "unknown preset" in bad.output


def test_inspect_real_preset_sizes(tmp_path):
    """The 0.8b preset's config gives the published parameter count without materialising weights."""
    from qwen35c.commands.inspect import summarize
    from reference.checkpoint import preset_config

    config = preset_config("0.8b")
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    info = summarize(tmp_path)
    assert 0.7e9 < info["parameters_total"] < 0.9e9
    assert info["kv_bytes_per_token_bf16"] == 6 * 2 * 2 * 256 * 2
    assert info["state_bytes_per_sequence"]["recurrent_fp32"] == 18 * 16 * 128 * 128 * 4
