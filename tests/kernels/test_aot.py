"""AOT compile of the kernel library for sm_80/89/90/100 (no GPU). Runs in a subprocess without
TRITON_INTERPRET, since interpreter tests in the same session set it before the kernels are defined."""

import pytest
from click.testing import CliRunner

from qwen35c.backends.triton import aot
from qwen35c.errors import QwenError

# One representative per family, from the 35B-A3B shapes (the 0.8B ones are the same kernels).
SUBSET = ["gemm_bf16_decode[35b-a3b]", "gemm_fp8_block_prefill[35b-a3b]", "gemm_int4_g128_decode[35b-a3b]",
          "rmsnorm_residual[35b-a3b]", "qk_norm_rope_q[35b-a3b]", "attn_prefill[35b-a3b]",
          "attn_decode_split[35b-a3b]", "moe_gate_up_prefill[35b-a3b]", "moe_route[35b-a3b]"]
# Our families (the GDN / conv kernels are checked by their owners' tests).
OURS = ("gemm_", "fp8_act_quant", "rmsnorm", "gated_rmsnorm", "qk_norm_rope", "attn_", "moe_")


def test_target_names():
    assert aot.target_sm("h100-fp8") == 90 and aot.target_sm("H200") == 90
    assert aot.target_sm("a100-int4") == 80 and aot.target_sm("l40s") == 89 and aot.target_sm("b200") == 100
    with pytest.raises(QwenError, match="no GPU kernels for target cpu"):
        aot.target_sm("cpu-fp32")
    with pytest.raises(QwenError, match="a100"):
        aot.target_sm("tpu-v5")


def test_specs_are_discovered_and_unique():
    for shapes in aot.SHAPES.values():
        names = [s.name for s in aot.discover_specs(shapes) if s.name.startswith(OURS)]
        assert len(names) == len(set(names)) and len(names) >= 15
        fp8 = [s for s in aot.discover_specs(shapes) if "fp8" in s.name]
        assert fp8 and all(s.min_sm == 89 for s in fp8)
    assert not any(s.name.startswith("moe_") for s in aot.discover_specs(aot.SHAPES["0.8b"]))


def test_ptx_version_is_capped():
    assert aot.ptx_version_for(90) == 90 and aot.ptx_version_for(100) == 90
    assert aot.ptx_version_for(80) <= 90


def test_compile_subset_all_sms():
    records = aot.compile_all_subprocess([80, 89, 90, 100], only=SUBSET, timeout=900)
    by = {(r.name, r.sm): r for r in records}
    assert len(records) == len(SUBSET) * 4
    report = []
    for (name, sm), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        assert r.error is None, f"{name} sm_{sm}: {r.error}"
        if "fp8" in name and sm < 89:
            assert r.skipped == "needs sm_89"
            continue
        assert r.registers and r.registers <= 255 and r.ptx_version in ("8.7", "8.8", "9.0")
        report.append(f"sm_{sm} {name}: regs={r.registers} smem={r.shared_bytes} spill={r.spill_bytes}")
    print("\n".join(report))
    spilling = [n for (n, sm), r in by.items() if sm == 90 and r.spill_bytes]
    assert not spilling, f"sm_90 configs we ship spill: {spilling}"


@pytest.mark.slow
def test_compile_everything_no_spills_on_sm90():
    records = aot.compile_all_subprocess([80, 89, 90, 100], timeout=3600)
    errors = [(r.name, r.sm, r.error) for r in records if r.error and r.name.startswith(OURS)]
    assert not errors, errors
    spilling = [(r.name, r.spill_bytes) for r in records if r.sm == 90 and r.spill_bytes and r.name.startswith(OURS)]
    assert not spilling, f"sm_90 configs we ship spill: {spilling}"


def test_cli_rejects_cpu_and_unknown_targets():
    from qwen35c.cli import main

    result = CliRunner().invoke(main, ["kernels", "--target", "cpu"])
    assert result.exit_code == 2 and "no GPU kernels for target cpu" in result.output
    result = CliRunner().invoke(main, ["kernels", "--target", "mi300"])
    assert result.exit_code == 2 and "h100" in result.output
