"""`qwen35c verify OUT`: manifest integrity and numerical parity with the reference (exit 0/1/2)."""

from __future__ import annotations

import click

from qwen35c.commands._common import emit_json, info


@click.command("verify")
@click.argument("artifact")
@click.option("--reference", default=None, help="Reference checkpoint (default: the manifest's source path).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--bisect", is_flag=True, help="Interpret the IR after every pass; name the first that breaks parity.")
@click.option("--threads", default=None, type=int, help="ORT intra-op threads.")
def command(artifact, reference, as_json, bisect, threads):
    """Exit 0 when every check that ran passed, 1 on a parity failure, 2 on a bad artifact or reference."""
    from qwen35c.verify import ParityFailure, verify_artifact

    report = verify_artifact(artifact, reference, bisect=bisect, threads=threads)
    if as_json:
        emit_json(report)
    else:
        for check in report["checks"]:
            info(f"  {check['name']:<10} {check['status'].upper():<8} {check['detail']}")
        for name, m in report.get("parity", {}).get("cases", {}).items():
            info(f"    {name:<34} max|Δ| {m['max_abs']:.2e}  mean|Δ| {m['mean_abs']:.2e}  cos {m['cosine_min']:.6f}  "
                 f"KL {m['kl_mean']:.2e}/{m['kl_p99']:.2e}  top1 {m['top1']:.3f}")
        if "parity" in report:
            info(f"    greedy continuation match: {report['parity']['greedy_match']:.3f}")
    if not report["passed"]:
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        raise ParityFailure(f"{artifact}: " + "; ".join(f"{c['name']}: {c['detail']}" for c in failed))
    if not as_json:
        info(f"{artifact}: verified" + ("" if all(c["status"] == "pass" for c in report["checks"])
                                        else " (some checks not run, see above)"))
