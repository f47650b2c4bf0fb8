"""Quantized checkpoints: official FP8 round trip (bit-identical), GPTQ v1/v2 and AWQ INT4."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwen35c.errors import QwenError
from qwen35c.quant import calibrate, emulate, parse_scheme, quantize_model
from qwen35c.quant.checkpoint import (
    awq_pack, awq_unpack, export_hf_fp8, gptq_pack, import_quantized, load_emulated_model, write_quantized,
)
from qwen35c.quant.formats import fp8_quantize, int4_quantize
from reference.checkpoint import Checkpoint, load_model, make_random_checkpoint


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype.itemsize == 1 else t.contiguous().view(torch.int16 if t.dtype.itemsize == 2 else torch.int32)


def _check_fp8_round_trip(src, out):
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["activation_scheme"] == "dynamic" and qc["fmt"] == "e4m3"
    quantized, _ = import_quantized(out)
    assert quantized.imported and quantized.source_format == "hf-fp8"
    source, written = Checkpoint(src), Checkpoint(out)
    try:
        for d in quantized.decisions:
            if d.quantize:
                q = quantized.weights[d.canonical]
                expected = fp8_quantize(_unit(source, d.name), "block")
                assert torch.equal(q.weight.view(torch.uint8), expected.weight.view(torch.uint8)), d.name
                assert torch.equal(q.scale, expected.scale), d.name
            elif d.name in source:                      # kept tensors are copied bit for bit
                assert torch.equal(_bits(written.view(d.name)), _bits(source.view(d.name))), d.name
    finally:
        source.close()
        written.close()
    return qc, quantized


def _unit(ckpt, name):
    """A per-expert unit of a fused source checkpoint, or the tensor itself."""
    if name in ckpt:
        return ckpt.view(name)
    head, e, part, _ = name.rsplit(".", 3)
    fused = ckpt.view(f"{head}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}")[int(e)]
    half = fused.shape[0] // 2
    return fused if part == "down_proj" else (fused[:half] if part == "gate_proj" else fused[half:])


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", dict(hidden_size=256, intermediate_size=384, tie_word_embeddings=True)),
    ("tiny-moe", dict(hidden_size=256, moe_intermediate_size=128)),
])
def test_official_fp8_round_trip(preset, overrides, checkpoint_factory, tmp_path):
    src = checkpoint_factory(preset, **overrides)
    out = export_hf_fp8(src, tmp_path / "fp8")
    qc, quantized = _check_fp8_round_trip(src, out)
    skip = set(qc["modules_to_not_convert"])
    p = "model.language_model.layers"
    assert "lm_head" in skip and f"{p}.0.linear_attn.in_proj_a" in skip and f"{p}.0.linear_attn.in_proj_b" in skip
    assert f"{p}.0.linear_attn.in_proj_qkv" not in skip and f"{p}.3.self_attn.q_proj" not in skip
    if preset == "tiny-moe":
        assert f"{p}.0.mlp.gate" in skip and f"{p}.0.mlp.shared_expert_gate" in skip
        assert not any(".experts." in m and not m.startswith("mtp.") for m in skip)
        names = set(Checkpoint(out).names())
        assert f"{p}.0.mlp.experts.3.up_proj.weight_scale_inv" in names      # unfused per expert
    # the emulating reference from disk equals emulate(reference, in-memory quantization), exactly
    model = load_model(src)
    in_memory = emulate(model, quantize_model(model, parse_scheme("fp8-block128")))
    from_disk, _ = load_emulated_model(out)
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_disk(ids), in_memory(ids))
        ref = model(ids).float().log_softmax(-1)
        emu = from_disk(ids).float().log_softmax(-1)
    kl = float((ref.exp() * (ref - emu)).sum(-1).mean())
    assert 0 < kl < 5e-3, kl


def test_fp8_import_refuses_inconsistent_checkpoints(checkpoint_factory, tmp_path):
    src = checkpoint_factory("tiny", hidden_size=256, intermediate_size=384)
    out = export_hf_fp8(src, tmp_path / "fp8")
    with pytest.raises(QwenError, match="never re-quantized"):
        export_hf_fp8(out, tmp_path / "again")
    config = json.loads((out / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    config["quantization_config"]["modules_to_not_convert"].append("model.language_model.layers.0.mlp.gate_proj")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(QwenError, match="modules_to_not_convert"):
        import_quantized(bad)
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(QwenError, match="weight_block_size"):
        import_quantized(bad)


def test_gptq_and_awq_packing_by_hand():
    codes = torch.arange(16).repeat(8, 1).t().contiguous().to(torch.uint8)     # [16, 8]: row n = code n
    w = int4_quantize(torch.zeros(16, 128), 128)
    from qwen35c.quant.formats import int4_pack_codes
    w.qweight = int4_pack_codes(codes.repeat(1, 16))                             # [16, 128] codes
    gptq = gptq_pack(w, version=2)
    assert gptq["qweight"].shape == (16, 16) and gptq["qzeros"].shape == (1, 2) and gptq["scales"].shape == (1, 16)
    assert int(gptq["qweight"][0, 3]) == 0x33333333                                # along K, sequential
    assert int(gptq["qzeros"][0, 0]) & 0xFFFFFFFF == 0x88888888                    # v2: real zero 8
    assert int(gptq_pack(w, version=1)["qzeros"][0, 0]) & 0xFFFFFFFF == 0x77777777
    awq = awq_pack(w)
    assert awq["qweight"].shape == (128, 2)
    word = int(awq["qweight"][0, 0]) & 0xFFFFFFFF                                   # columns 0..7 of row k=0
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(awq_unpack(awq, 128).codes(), w.codes())


@pytest.mark.parametrize("fmt,version,symmetric", [("gptq", 1, True), ("gptq", 2, False), ("awq", 0, False)])
def test_int4_checkpoint_round_trip(fmt, version, symmetric, checkpoint_factory, tmp_path):
    src = checkpoint_factory("tiny-moe", hidden_size=256, moe_intermediate_size=128)
    model = load_model(src)
    recipe = parse_scheme("int4-gptq" if fmt == "gptq" else "int4-rtn", symmetric=symmetric)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    calib = calibrate.collect(model, [ids[:1], ids[1:]]) if recipe.needs_calibration else None
    quantized = quantize_model(model, recipe, calib)
    out = write_quantized(src, tmp_path / fmt, recipe, fmt, quantized, gptq_version=version or 2)
    back, qc = import_quantized(out)
    assert back.imported and set(back.weights) == set(quantized.weights)
    for name, q in quantized.weights.items():
        b = back.weights[name]
        assert torch.equal(b.codes(), q.codes()), name                           # codes bit-identical
        assert torch.equal(b.scales, q.scales.half().float()), name              # fp16 scales on disk
        assert (b.zeros is None) == symmetric
    if fmt == "gptq":
        assert back.source_format == f"gptq-v{version}"
    emulated, _ = load_emulated_model(out)
    with torch.no_grad():
        assert torch.isfinite(emulated(ids[:1])).all()


def test_gptq_v2_zeros_declared_v1_are_detected(checkpoint_factory, tmp_path):
    """Qwen's GPTQ-Int4 stores v2 zeros (8) while declaring checkpoint_format 'gptq'."""
    src = checkpoint_factory("tiny", hidden_size=256, intermediate_size=384)
    model = load_model(src)
    recipe = parse_scheme("int4-rtn")
    quantized = quantize_model(model, recipe)
    out = write_quantized(src, tmp_path / "g", recipe, "gptq", quantized, gptq_version=2)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq"
    (out / "config.json").write_text(json.dumps(config))
    back, _ = import_quantized(out)
    assert back.source_format == "gptq-v2" and any("v2" in n for n in back.notes)
    for name, q in quantized.weights.items():
        assert torch.equal(back.weights[name].codes(), q.codes()) and back.weights[name].zeros is None


@pytest.mark.slow
def test_official_fp8_round_trip_real_08b_shapes(tmp_path):
    src = make_random_checkpoint("0.8b", 0, tmp_path / "src", num_hidden_layers=4, vocab_size=4096)
    out = export_hf_fp8(src, tmp_path / "fp8")
    qc, quantized = _check_fp8_round_trip(src, out)
    assert len(quantized.weights) == 3 * 6 + 7          # 3 GDN layers (qkv, z, out + MLP), 1 attention layer
    scale = quantized.weights["model.layers.0.mlp.down_proj.weight"].scale
    assert scale.shape == (8, 28)                                                 # [1024/128, 3584/128]
