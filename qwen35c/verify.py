"""`verify`: is a built artifact intact, and does it compute what the reference model computes?

Checks, in order (each reported as pass / fail / not run, never a pass it did not run):
  manifest   schema version, every file's size and sha256, no unlisted files      (bad -> exit 2)
  target     can this machine execute the artifact (CPU targets: always)
  reference  the reference checkpoint exists and its files hash as the manifest says
  parity     artifact vs reference on a built-in prompt set: single prompts around the 64-token
             chunk boundaries (full prefill logits at every position), a batch of different lengths
             (prefill, then teacher-forced decode steps), and greedy continuations
Metrics per case: max / mean |Δlogit|, min cosine, KL(ref || artifact) mean and p99, top-1
agreement; gated by the target's precision (`qwen35c.targets.GATES`). Parity failure -> exit 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qwen35c.errors import QwenError

SINGLE_LENGTHS = (1, 63, 64, 65, 127, 129)
BATCH_LENGTHS = (5, 64, 33)
DECODE_STEPS = 8


class ParityFailure(QwenError):
    """The artifact's numbers differ from the reference beyond the precision's gate (exit 1)."""

    exit_code = 1


def _metrics(got: torch.Tensor, want: torch.Tensor) -> dict:
    """got/want [N, V] logits of the same positions."""
    got, want = got.double(), want.double()
    diff = (got - want).abs()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    logp_want, logp_got = want.log_softmax(-1), got.log_softmax(-1)
    kl = (logp_want.exp() * (logp_want - logp_got)).sum(-1).clamp_min(0)
    return {"positions": int(got.shape[0]), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "cosine_min": float(cos.min()), "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl, 0.99)) if kl.numel() > 1 else float(kl.max()),
            "top1": float((got.argmax(-1) == want.argmax(-1)).double().mean())}


def _merge(cases: list[dict]) -> dict:
    n = sum(c["positions"] for c in cases)
    return {"positions": n, "max_abs": max(c["max_abs"] for c in cases),
            "mean_abs": sum(c["mean_abs"] * c["positions"] for c in cases) / n,
            "cosine_min": min(c["cosine_min"] for c in cases),
            "kl_mean": sum(c["kl_mean"] * c["positions"] for c in cases) / n,
            "kl_p99": max(c["kl_p99"] for c in cases),
            "top1": sum(c["top1"] * c["positions"] for c in cases) / n}


def gate(metrics: dict, precision: str, greedy_match: float | None) -> tuple[bool, list[str]]:
    from qwen35c.targets import GATES

    limits, failures = GATES[precision], []
    if "max_abs_logit" in limits and not metrics["max_abs"] <= limits["max_abs_logit"]:
        failures.append(f"max |Δlogit| {metrics['max_abs']:.3g} > {limits['max_abs_logit']:g}")
    if "kl_mean" in limits and not metrics["kl_mean"] <= limits["kl_mean"]:
        failures.append(f"mean KL {metrics['kl_mean']:.3g} > {limits['kl_mean']:g}")
    if not metrics["top1"] >= limits["top1"]:
        failures.append(f"top-1 agreement {metrics['top1']:.4f} < {limits['top1']:g}")
    if precision == "fp32" and greedy_match is not None and greedy_match < 1.0:
        failures.append(f"greedy continuation match {greedy_match:.3f} < 1")
    if any(math.isnan(v) for v in metrics.values() if isinstance(v, float)):
        failures.append("NaN in the metrics")
    return not failures, failures


def compare(artifact, reference, *, single=SINGLE_LENGTHS, batch=BATCH_LENGTHS, steps=DECODE_STEPS,
            seed: int = 0) -> dict:
    """Run both sessions on the prompt set; returns per-case metrics, totals and greedy match."""
    vocab = reference.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    cases = {}
    for length in single:
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        cases[f"prefill T={length}"] = _metrics(artifact.logits(ids)[0].float(), reference.logits(ids)[0].float())
    greedy = None
    if batch:
        lengths = list(batch)
        width = max(lengths)
        ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
        lens = torch.tensor(lengths)
        sa, sr = artifact.new_state(len(lengths), width + steps + 1), reference.new_state(len(lengths), width + steps + 1)
        la, lr = artifact.prefill(ids, sa, lens).float(), reference.prefill(ids, sr, lens).float()
        cases[f"batch prefill lengths={lengths}"] = _metrics(
            torch.cat([la[b, :n] for b, n in enumerate(lengths)]), torch.cat([lr[b, :n] for b, n in enumerate(lengths)]))
        nxt = torch.stack([lr[b, n - 1] for b, n in enumerate(lengths)]).argmax(-1)
        got, want = [], []
        for _ in range(steps):
            da, dr = artifact.decode(nxt.view(-1, 1), sa)[:, 0].float(), reference.decode(nxt.view(-1, 1), sr)[:, 0].float()
            got.append(da)
            want.append(dr)
            nxt = dr.argmax(-1)  # teacher-forced with the reference's choice
        if steps:
            cases[f"batch decode x{steps}"] = _metrics(torch.cat(got), torch.cat(want))
        prompts = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
        ga = artifact.generate(prompts, steps).tokens
        gr = reference.generate(prompts, steps).tokens
        matched = total = 0
        for a_row, r_row in zip(ga, gr):
            total += len(r_row)
            for x, y in zip(a_row, r_row):
                if x != y:
                    break
                matched += 1
        greedy = matched / total if total else 1.0
    return {"cases": cases, "total": _merge(list(cases.values())), "greedy_match": greedy}


def _reference_session(path: Path):
    from qwen35c.runtime.session import ReferenceSession

    return ReferenceSession.from_checkpoint(path, "float32")


def quick_parity(artifact_dir: Path, model_dir: Path, precision: str) -> dict:
    """The build's own check: a few short prompts; numbers rounded so builds stay byte-identical."""
    from qwen35c.backends.onnx.session import OnnxSession
    from qwen35c.artifact import read_manifest

    session = OnnxSession(artifact_dir, read_manifest(artifact_dir), threads=1)
    result = compare(session, _reference_session(model_dir), single=(1, 65), batch=(3, 9), steps=4)
    ok, failures = gate(result["total"], precision, result["greedy_match"])
    total = {k: (float(f"{v:.2g}") if isinstance(v, float) else v) for k, v in result["total"].items()}
    summary = "pass" if ok else "; ".join(failures)
    return {"status": "pass" if ok else "fail", "passed": ok, "by": "build", "precision": precision,
            "prompts": "T=1, T=65, batch [3, 9] + 4 decode steps", "metrics": total,
            "greedy_match": result["greedy_match"], "summary": summary}


def verify_artifact(directory: str | Path, reference: str | Path | None = None, bisect: bool = False,
                    threads: int | None = None) -> dict:
    """The full verification; raises ArtifactError (exit 2) on bad input, returns the report."""
    from qwen35c.artifact import ArtifactError, check_files, read_manifest, sha256_file
    from qwen35c.targets import get_target, runnable_here

    directory = Path(directory)
    checks: list[dict] = []
    manifest = read_manifest(directory)
    files = check_files(directory, manifest)
    checks.append({"name": "manifest", "status": "pass",
                   "detail": f"schema {manifest['schema_version']}, {len(files)} files hash as recorded"})
    target = get_target(manifest["target"]["name"])
    runnable, why = runnable_here(target)
    checks.append({"name": "target", "status": "pass" if runnable else "not run", "detail": why})
    ref_path = Path(reference) if reference else Path(manifest.get("source", {}).get("path", ""))
    if not reference and not manifest.get("source", {}).get("path"):
        raise ArtifactError(f"{directory}: the manifest names no source checkpoint; pass --reference DIR")
    if not (ref_path / "config.json").is_file():
        raise ArtifactError(f"{ref_path}: reference checkpoint missing (no config.json); pass --reference DIR")
    recorded = manifest.get("source", {}).get("files", {})
    mismatched = [n for n, h in sorted(recorded.items())
                  if not (ref_path / n).is_file() or sha256_file(ref_path / n) != h]
    if mismatched:
        raise ArtifactError(f"{ref_path / mismatched[0]}: differs from the checkpoint the artifact was built from")
    checks.append({"name": "reference", "status": "pass", "detail": f"{ref_path} matches the source hashes"})
    report = {"artifact": str(directory), "target": target.name, "precision": target.precision,
              "checks": checks, "passed": None}
    if not runnable:
        checks.append({"name": "parity", "status": "not run", "detail": why})
    else:
        from qwen35c.runtime import load

        artifact = load(directory, check=False, threads=threads)
        result = compare(artifact, _reference_session(ref_path))
        ok, failures = gate(result["total"], target.precision, result["greedy_match"])
        report["parity"] = result
        checks.append({"name": "parity", "status": "pass" if ok else "fail",
                       "detail": "within the fp32 gate" if ok and target.precision == "fp32" else
                       ("within the gate" if ok else "; ".join(failures))})
    if bisect:
        failed = any(c["name"] == "parity" and c["status"] == "fail" for c in checks)
        report["bisect"] = run_bisect(manifest, ref_path, artifact_failed=failed)
        checks.append({"name": "bisect", "status": "pass" if report["bisect"]["first_broken"] is None else "fail",
                       "detail": f"first broken: {report['bisect']['first_broken'] or 'none'}"})
    ran = [c for c in checks if c["status"] != "not run"]
    report["passed"] = all(c["status"] == "pass" for c in ran)
    return report


def run_bisect(manifest: dict, ref_path: Path, tolerance: float = 1e-4, artifact_failed: bool = False) -> dict:
    """Interpret the IR after every pass of the artifact's pipeline; name the first pass that breaks
    parity with the reference, or the backend when every pass holds but the artifact does not."""
    from qwen35c.graph.trace import trace_checkpoint
    from qwen35c.passes.parity import check_each_pass
    from reference.checkpoint import load_model

    model = load_model(ref_path, torch.float32)
    _graph, _stats, parity = check_each_pass(trace_checkpoint(ref_path).graph, manifest["pipeline"], model,
                                             tolerance=tolerance)
    first = parity.first_broken
    out = parity.to_json()
    out["first_broken"] = first
    if first is None and artifact_failed:
        out["first_broken"] = f"backend:{manifest['backend']['name']}"
    return out


__all__ = ["ParityFailure", "compare", "gate", "quick_parity", "run_bisect", "verify_artifact"]
