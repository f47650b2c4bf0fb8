"""AOT compile of the kernel library for sm_80/89/90/100 (no GPU). Runs in a subprocess without
TRITON_INTERPRET, since interpreter tests in the same session set it before the kernels are defined."""

import pytest
from click.testing import CliRunner

from qwen35c.backends.triton import aot
from qwen35c.errors import QwenError

SMS = [80, 89, 90, 100]
# One representative per family, from the 35B-A3B shapes (the 0.8B ones are the same kernels), with
# the highest-register kernel of the GDN and causal-conv families.
SUBSET = ["gemm_bf16_decode[35b-a3b]", "gemm_fp8_block_prefill[35b-a3b]", "gemm_int4_g128_prefill[35b-a3b]",
          "rmsnorm_residual[35b-a3b]", "qk_norm_rope_q[35b-a3b]", "attn_prefill[35b-a3b]",
          "attn_decode_split[35b-a3b]", "moe_gate_up_prefill[35b-a3b]", "moe_route[35b-a3b]",
          "gdn_chunk_prep[35b-a3b]", "gdn_chunk_fwd_h[35b-a3b]", "causal_conv1d[35b-a3b]"]


def shipped_names() -> set[str]:
    """Every spec name the library ships, over every shape set."""
    return {s.name for shapes in aot.SHAPES.values() for s in aot.discover_specs(shapes)}


def check_records(records, names):
    """The gate: every (kernel, SM) compiled (or skipped below its min_sm), <= 255 registers, no spill."""
    by = {(r.name, r.sm): r for r in records}
    assert set(by) == {(n, sm) for n in names for sm in SMS} and len(records) == len(by)
    specs = {s.name: s for shapes in aot.SHAPES.values() for s in aot.discover_specs(shapes)}
    errors, spilling, report = [], [], []
    for (name, sm), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if r.error is not None:
            errors.append(f"{name} sm_{sm}: {r.error}")
            continue
        if sm < specs[name].min_sm:
            assert r.skipped == f"needs sm_{specs[name].min_sm}", (name, sm, r.skipped)
            continue
        assert r.skipped is None and r.registers and r.registers <= 255, (name, sm, r.registers)
        assert r.ptx_version in ("8.7", "8.8", "9.0"), (name, sm, r.ptx_version)
        if r.spill_bytes:
            spilling.append(f"{name} sm_{sm}: {r.spill_bytes} bytes")
        report.append(f"sm_{sm} {name}: regs={r.registers} smem={r.shared_bytes} spill={r.spill_bytes}")
    print("\n".join(report))
    assert not errors, f"kernels that do not compile: {errors}"
    assert not spilling, f"configs we ship spill: {spilling}"


def test_target_names():
    assert aot.target_sm("h100-fp8") == 90 and aot.target_sm("H200") == 90
    assert aot.target_sm("a100-int4") == 80 and aot.target_sm("l40s") == 89 and aot.target_sm("b200") == 100
    with pytest.raises(QwenError, match="no GPU kernels for target cpu"):
        aot.target_sm("cpu-fp32")
    with pytest.raises(QwenError, match="a100"):
        aot.target_sm("tpu-v5")


def test_specs_are_discovered_and_unique():
    for shapes in aot.SHAPES.values():
        names = [s.name for s in aot.discover_specs(shapes)]
        assert len(names) == len(set(names)) and len(names) >= 20
        assert any(n.startswith("gdn_chunk_prep") for n in names) and any(n.startswith("causal_conv1d") for n in names)
        fp8 = [s for s in aot.discover_specs(shapes) if "fp8" in s.name]
        assert fp8 and all(s.min_sm == 89 for s in fp8)
    assert not any(s.name.startswith("moe_") for s in aot.discover_specs(aot.SHAPES["0.8b"]))
    assert set(SUBSET) <= shipped_names()


def test_ptx_version_is_capped():
    assert aot.ptx_version_for(90) == 90 and aot.ptx_version_for(100) == 90
    assert aot.ptx_version_for(80) <= 90


def test_compile_subset_all_sms():
    records = aot.compile_all_subprocess(SMS, only=SUBSET, timeout=900)
    check_records(records, SUBSET)


@pytest.mark.slow
def test_compile_everything_no_errors_no_spills():
    """Every kernel the library ships, for every shape set and SM (200 compiles, ~95 s on 2 cores)."""
    records = aot.compile_all_subprocess(SMS, timeout=3600)
    check_records(records, shipped_names())


def test_cli_rejects_cpu_and_unknown_targets():
    from qwen35c.cli import main

    result = CliRunner().invoke(main, ["kernels", "--target", "cpu"])
    assert result.exit_code == 2 and "no GPU kernels for target cpu" in result.output
    result = CliRunner().invoke(main, ["kernels", "--target", "mi300"])
    assert result.exit_code == 2 and "h100" in result.output
