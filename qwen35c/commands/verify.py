"""`qwen35c verify OUT`: manifest integrity and numerical parity with the reference (exit 0/1/2)."""

from __future__ import annotations

import click

from qwen35c.commands._common import THREADS, emit_json, info, status


@click.command("verify")
@click.argument("artifact")
@click.option("--reference", default=None, help="Reference checkpoint (default: the manifest's source path).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--bisect", is_flag=True, help="Interpret the IR after every pass; name the first that breaks parity.")
@click.option("--threads", default=None, type=THREADS, help="Intra-op threads of the artifact's runtime.")
@click.option("--structure-only", is_flag=True,
              help="Check the manifest, the files and the reference only; do not execute the artifact.")
@click.option("--skip", "skip", multiple=True, type=click.Choice(["quantization", "speculative", "mtp", "bisect"]),
              help="Do not run this check (reported as skipped); repeatable.")
@click.option("--prompts", type=click.Choice(["full", "short"]), default="full", show_default=True,
              help="Parity prompt set: full (lengths 1/63/64/65/127/129, batch 5/64/33, 8 decode steps) or "
                   "short (1/65, batch 3/9, 4 decode steps: for a triton artifact under the interpreter).")
def command(artifact, reference, as_json, bisect, threads, structure_only, skip, prompts):
    """Exit 0 when the artifact was executed and every check that ran passed, 1 on a parity failure,
    2 on a bad artifact or reference or a check that could not run."""
    from qwen35c.errors import QwenError
    from qwen35c.verify import ParityFailure, verify_artifact

    with status("verify", quiet=as_json) as say:
        report = verify_artifact(artifact, reference, bisect=bisect, threads=threads,
                                 structure_only=structure_only, skip=tuple(skip), progress=say, prompts=prompts)
    if as_json:
        emit_json(report)
    else:
        for check in report["checks"]:
            info(f"  {check['name']:<12} {check['status'].upper():<8} {check['detail']}")
        for name, m in report.get("parity", {}).get("cases", {}).items():
            info(f"    {name:<34} max|Δ| {m['max_abs']:.2e}  mean|Δ| {m['mean_abs']:.2e}  cos {m['cosine_min']:.6f}  "
                 f"KL {m['kl_mean']:.2e}/{m['kl_p99']:.2e}  top1 {m['top1']:.3f}")
        if "memory" in report:
            memory = report["memory"]
            have = f", {memory['available_bytes'] / 2**30:.1f} GiB available" if memory["available_bytes"] else ""
            info(f"  {'memory':<12} estimated peak ~{memory['estimated_peak_bytes'] / 2**30:.1f} GiB{have}")
        if "parity" in report:
            info(f"    greedy continuation match: {report['parity']['greedy_match']:.3f} "
                 f"({report['parity'].get('prompts', 'full')} prompt set; ran as {report.get('mode')})")
    if report["status"] == "fail":
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        raise ParityFailure(f"{artifact}: " + "; ".join(f"{c['name']}: {c['detail']}" for c in failed))
    if report["status"] == "incomplete":
        missing = [c for c in report["checks"] if c["status"] == "not run"]
        raise QwenError(f"{artifact}: not verified: " + "; ".join(f"{c['name']} not run ({c['detail']})"
                                                                   for c in missing))
    if not as_json:
        info(f"{artifact}: " + ("structure verified; the artifact was NOT executed (--structure-only)"
                                if report["status"] == "structure-only" else
                                "verified" + (f" ({', '.join(skip)} skipped)" if skip else "")))
