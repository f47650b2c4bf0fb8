"""`verify`: is a built artifact intact, and does it compute what the reference model computes?

Checks, in order (each reported as pass / fail / not run / skipped, never a pass it did not run):
  manifest   types of every key, paths inside the artifact, no symlinks, every file's size and sha256,
             no unlisted files, the backend's own section                      (bad -> exit 2)
  reference  the reference checkpoint exists and its files hash as the manifest says (bad -> exit 2)
  target     can this machine execute the artifact (CPU targets: always)
  parity     artifact vs reference on a built-in prompt set: single prompts around the 64-token
             chunk boundaries (full prefill logits at every position), a batch of different lengths
             (prefill, then decode steps fed fixed random tokens), and greedy continuations. The
             artifact runs the set first (`record`: its logits to a scratch file) and is dropped;
             the reference then computes the same positions teacher-forced, the whole set in one
             pass over its layers (`against`): a check holds the larger of the two, never both
Metrics per case: max / mean |Δlogit|, min cosine, KL(ref || artifact) mean and p99, top-1
agreement; gated by the target's precision (`qwen35c.targets.GATES`).
  speculative  (artifacts with a commit step) a verify step with drafts leaves the state of a step
             over the committed tokens alone, and speculative greedy decoding (perfect, noisy and
             always-wrong drafts, K = 1..3) gives plain greedy decoding's tokens on the batch prompts
  mtp        (artifacts with an MTP head) the head's graph against the reference MTP module
             (`reference.stream.StreamedModel.load_mtp`, the same LM head as the parity check's
             reference) on the main graph's hidden states of the batch prompts: its hidden states at
             every pair and the logits of the last, fed in one step and in two (its KV cache); the
             model joined with its head (what MTP drafting runs): its head states and drafts, and
             MTP-drafted greedy decoding == plain greedy decoding

Exit codes: 0 only when the artifact was executed and every check that ran passed; 1 when a check
failed; 2 when the input is bad or a check could not run (the report says why). Asking for less is
explicit and printed as such: `--structure-only` (no execution), `--skip quantization`.

A quantized artifact (manifest `quantization` section) is checked twice, separately:
  parity        artifact vs the quantization-emulating reference (the reference model with the same
                packed weights dequantized, activations fake-quantized; rebuilt with
                `qwen35c.quant.build.prepare` and matched by the packed-weight sha256) on the prompt
                set above, at the fp32 gate (max |Δlogit| <= 1e-3, top-1 100%): the lowering error.
                Recipes that quantize activations at run time (FP8 dynamic / static) use the
                `quantized-activations` gate instead (`lowering_gate`; why: qwen35c.targets.GATES).
                Not run (never run against other weights) when the digest cannot be reproduced.
  quantization  the emulation vs the full-precision reference, teacher-forced on held-out text
                (`heldout_ids`), at the recipe's precision gate (fp8 / int4): the quantization loss.
                Not run for a checkpoint without a tokenizer.json.

Both references (full precision and emulating) are streamed (`reference.stream.StreamedModel`): one
decoder layer resident at a time, the same logits bit for bit as the resident reference. The
speculative and MTP checks load the artifact again after the references are done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen35c.errors import QwenError
from reference.stream import return_freed_memory

SINGLE_LENGTHS = (1, 63, 64, 65, 127, 129)
BATCH_LENGTHS = (5, 64, 33)
DECODE_STEPS = 8
# The prompt sets of the parity check. "full" straddles both chunk boundaries at prefill; "short" is
# the build's own check (for slow runtimes, e.g. a triton artifact under the interpreter): it still
# crosses the first chunk boundary (65), runs a padded batch and decodes past the prompt.
PROMPT_SETS = {"full": {"single": SINGLE_LENGTHS, "batch": BATCH_LENGTHS, "steps": DECODE_STEPS},
               "short": {"single": (1, 65), "batch": (3, 9), "steps": 4}}


class ParityFailure(QwenError):
    """The artifact's numbers differ from the reference beyond the precision's gate (exit 1)."""

    exit_code = 1


METRIC_ROWS = 16   # positions per slice in _metrics: fp64 [rows, V] temporaries, not [N, V] (248K vocab: 32 MB each)


def _metric_parts(got: torch.Tensor, want: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Per-position pieces of the metrics of got/want [N, V] (fp64, METRIC_ROWS positions at a time,
    so the temporaries stay small at a large vocabulary); with `targets` [N], both sides' NLL sums."""
    parts = {"n": int(got.shape[0]), "numel": got.numel(), "max_abs": 0.0, "abs_sum": 0.0,
             "nll_got": 0.0, "nll_want": 0.0, "cos": [], "kl": [], "top1": []}
    for begin in range(0, parts["n"], METRIC_ROWS):
        g, w = got[begin:begin + METRIC_ROWS].double(), want[begin:begin + METRIC_ROWS].double()
        diff = (g - w).abs()
        parts["max_abs"], parts["abs_sum"] = max(parts["max_abs"], float(diff.max())), parts["abs_sum"] + float(diff.sum())
        parts["cos"].append(torch.nn.functional.cosine_similarity(g, w, dim=-1))
        logp_want, logp_got = w.log_softmax(-1), g.log_softmax(-1)
        parts["kl"].append((logp_want.exp() * (logp_want - logp_got)).sum(-1).clamp_min(0))
        parts["top1"].append(g.argmax(-1) == w.argmax(-1))
        if targets is not None:
            t = targets[begin:begin + METRIC_ROWS, None]
            parts["nll_got"] -= float(logp_got.gather(1, t).sum())
            parts["nll_want"] -= float(logp_want.gather(1, t).sum())
    return parts


def _reduce(parts: list[dict]) -> dict:
    n, numel = sum(p["n"] for p in parts), sum(p["numel"] for p in parts)
    cos, kl, top1 = (torch.cat([t for p in parts for t in p[key]]) for key in ("cos", "kl", "top1"))
    return {"positions": n, "max_abs": max(p["max_abs"] for p in parts),
            "mean_abs": sum(p["abs_sum"] for p in parts) / numel,
            "cosine_min": float(cos.min()), "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl, 0.99)) if kl.numel() > 1 else float(kl.max()),
            "top1": float(top1.double().mean())}


def _metrics(got: torch.Tensor, want: torch.Tensor) -> dict:
    """got/want [N, V] logits of the same positions."""
    return _reduce([_metric_parts(got, want)])


def _merge(cases: list[dict]) -> dict:
    n = sum(c["positions"] for c in cases)
    return {"positions": n, "max_abs": max(c["max_abs"] for c in cases),
            "mean_abs": sum(c["mean_abs"] * c["positions"] for c in cases) / n,
            "cosine_min": min(c["cosine_min"] for c in cases),
            "kl_mean": sum(c["kl_mean"] * c["positions"] for c in cases) / n,
            "kl_p99": max(c["kl_p99"] for c in cases),
            "top1": sum(c["top1"] * c["positions"] for c in cases) / n}


def limits_of(precision: str, floor: dict | None = None) -> dict:
    """The gate's limits; for `quantized-activations`, widened to the measured noise floor."""
    from qwen35c.targets import GATES

    limits = dict(GATES[precision])
    if precision == "quantized-activations":
        if floor is None:
            raise ValueError("the quantized-activations gate needs the reference's noise floor")
        limits["kl_mean"] = max(limits["kl_mean"], limits.pop("floor_kl_factor") * floor["kl_mean"])
        limits["top1"] = min(limits["top1"], floor["top1"] - max(limits.pop("floor_top1_margin"), _top1_noise(floor)))
    return limits


def _top1_noise(floor: dict) -> float:
    """Three standard deviations of the difference between two top-1 agreement rates on the floor's
    positions, both at the floor's rate (binomial). Where logits are nearly flat (random weights),
    two equally noisy runs part by points: the 0.8b preset's cpu-int4 build, floor top-1 0.866 on
    575 positions, failed with 0.828 (1.8 standard deviations; its KL passed). KL tells a lowering
    bug from the noise (qwen35c.targets.GATES); top-1 is only held to what its sample size can say."""
    p, n = floor["top1"], floor.get("positions", 0)
    return 3.0 * math.sqrt(2.0 * p * (1.0 - p) / n) if n else 0.0


def gate(metrics: dict, precision: str, greedy_match: float | None, floor: dict | None = None) -> tuple[bool, list[str]]:
    limits, failures = limits_of(precision, floor), []
    if "max_abs_logit" in limits and not metrics["max_abs"] <= limits["max_abs_logit"]:
        failures.append(f"max |Δlogit| {metrics['max_abs']:.3g} > {limits['max_abs_logit']:g}")
    if "kl_mean" in limits and not metrics["kl_mean"] <= limits["kl_mean"]:
        failures.append(f"mean KL {metrics['kl_mean']:.3g} > {limits['kl_mean']:.3g}")
    if not metrics["top1"] >= limits["top1"]:
        failures.append(f"top-1 agreement {metrics['top1']:.4f} < {limits['top1']:.4g}")
    if precision == "fp32" and greedy_match is not None and greedy_match < 1.0:
        failures.append(f"greedy continuation match {greedy_match:.3f} < 1")
    if any(math.isnan(v) for v in metrics.values() if isinstance(v, float)):
        failures.append("NaN in the metrics")
    if failures and floor is not None:
        failures.append(f"the reference's own noise floor: mean KL {floor['kl_mean']:.3g}, top-1 {floor['top1']:.4f}")
    return not failures, failures


# ---- the prompt set, run by each side in turn --------------------------------------------------------
# The artifact runs the set the way a user runs it (prefill, decode steps, greedy generation) and its
# logits are recorded (spilled to a scratch file: ~1 MB a position at a 248K vocabulary); then it can
# be dropped, and the reference computes the same positions teacher-forced, every sequence of the set
# in one call (`Session.logits_each`: one pass over the weights of a streamed reference). A check so
# holds the larger of the two, never both, and a streamed reference reads its layers once, not once
# per decode step.
@dataclass
class PromptPlan:
    """The inputs of a comparison, drawn from a seed: single prompts (full prefill logits), a batch of
    different lengths (prefill, then `steps` decode steps fed the random tokens `follow`, teacher-
    forced) and that batch's greedy continuation."""

    singles: list[torch.Tensor]          # [1, n] each
    prompts: list[list[int]]             # the batch's rows
    follow: torch.Tensor                 # [B, steps]
    steps: int

    def describe(self) -> str:
        singles = ", ".join(f"T={ids.shape[1]}" for ids in self.singles)
        return f"{singles}, batch {[len(p) for p in self.prompts]} + {self.steps} decode steps"

    def padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, lengths


def prompt_plan(vocab: int, single=SINGLE_LENGTHS, batch=BATCH_LENGTHS, steps=DECODE_STEPS, seed: int = 0) -> PromptPlan:
    gen = torch.Generator().manual_seed(seed)
    singles = [torch.randint(0, vocab, (1, n), generator=gen) for n in single]
    prompts, follow = [], torch.zeros(0, steps, dtype=torch.long)
    if batch:
        ids = torch.randint(0, vocab, (len(batch), max(batch)), generator=gen)
        prompts = [ids[b, :n].tolist() for b, n in enumerate(batch)]
        follow = torch.randint(0, vocab, (len(batch), steps), generator=gen)
    return PromptPlan(singles, prompts, follow, steps)


def _case_names(plan: PromptPlan) -> list[str]:
    names = [f"prefill T={ids.shape[1]}" for ids in plan.singles]
    if plan.prompts:
        names.append(f"batch prefill lengths={[len(p) for p in plan.prompts]}")
        if plan.steps:
            names.append(f"batch decode x{plan.steps}")
    return names


@dataclass
class Recording:
    """One side's logits on a plan (case name -> [positions, V] fp32, valid positions only; read-only
    views of a scratch file) and its greedy continuation of the batch (None: not generated)."""

    plan: PromptPlan
    logits: dict[str, torch.Tensor]
    greedy: list[list[int]] | None
    spill: object = None

    def release(self) -> None:
        if self.spill is not None:
            self.spill.release()


def _recorded(plan: PromptPlan, cases, greedy=None) -> Recording:
    """A Recording of (case name, logits) pairs on `plan`, each spilled as it comes."""
    from qwen35c.quant.spill import Spill

    logits, spill = {}, Spill()
    for name, value in cases:
        logits.update(spill.tensors({name: value.float().contiguous()}, "recorded logits"))
        del value
        return_freed_memory()
    spill.release()
    return Recording(plan, logits, greedy() if greedy else None, spill)


def record(session, plan: PromptPlan) -> Recording:
    """Run `session` on the plan as a user runs it: each single prompt prefilled; the batch prefilled
    (rows of different lengths), decoded `steps` steps and continued greedily."""
    def cases():
        names = iter(_case_names(plan))
        for ids in plan.singles:
            yield next(names), session.logits(ids)[0]
        if plan.prompts:
            ids, lengths = plan.padded(plan.prompts)
            state = session.new_state(len(plan.prompts), ids.shape[1] + plan.steps + 1)
            out = session.prefill(ids, state, lengths)
            yield next(names), torch.cat([out[b, :n] for b, n in enumerate(lengths.tolist())])
            del out
            if plan.steps:     # row-major: row b's steps in order
                steps = [session.decode(plan.follow[:, k:k + 1], state)[:, 0] for k in range(plan.steps)]
                yield next(names), torch.stack(steps, 1).flatten(0, 1)

    def greedy():
        return session.generate(plan.prompts, plan.steps).tokens

    return _recorded(plan, cases(), greedy if plan.prompts and plan.steps else None)


def _teacher_forced(reference, plan: PromptPlan, greedy: list[list[int]] | None = None):
    """(case name, logits [positions, V]) of `reference` on the plan, teacher-forced, in one
    `logits_each` call; with `greedy` (the artifact's continuation) last ("greedy", per-row logits
    at the positions that chose each token)."""
    batches = [(ids, None) for ids in plan.singles]
    lengths = [len(p) for p in plan.prompts]
    if plan.prompts:
        batches.append(plan.padded([p + f for p, f in zip(plan.prompts, plan.follow.tolist())]))
    if greedy is not None:
        batches.append(plan.padded([p + g[:-1] for p, g in zip(plan.prompts, greedy)]))
    names, out = _case_names(plan), reference.logits_each(batches)
    for ids in plan.singles:
        yield names.pop(0), next(out)[0].float()
    if plan.prompts:
        both = next(out).float()
        yield names.pop(0), torch.cat([both[b, :n] for b, n in enumerate(lengths)])
        if plan.steps:
            yield names.pop(0), torch.cat([both[b, n:n + plan.steps] for b, n in enumerate(lengths)])
        del both
    if greedy is not None:
        rows = next(out).float()
        yield "greedy", [rows[b, n - 1:n - 1 + len(g)] for b, (n, g) in enumerate(zip(lengths, greedy))]


def record_teacher_forced(reference, plan: PromptPlan) -> Recording:
    """The plan's logits of a reference, teacher-forced (one pass), recorded like `record`'s."""
    return _recorded(plan, _teacher_forced(reference, plan))


def against(reference, sides: dict[str, Recording]) -> dict[str, dict]:
    """Compare each recorded side (all on one plan) with `reference`'s teacher-forced logits of the
    same positions, computed once for all of them. Per side: per-case metrics, totals and, for the
    side that generated (at most one), the greedy match (`_greedy_match`)."""
    plan = next(iter(sides.values())).plan
    assert all(side.plan is plan for side in sides.values()), "sides recorded on different plans"
    generated = [name for name, side in sides.items() if side.greedy is not None]
    assert len(generated) <= 1, "one greedy continuation per reference pass"
    cases: dict[str, dict] = {name: {} for name in sides}
    greedy_logits = None
    for case, want in _teacher_forced(reference, plan, sides[generated[0]].greedy if generated else None):
        if case == "greedy":
            greedy_logits = want
            continue
        for name, side in sides.items():
            cases[name][case] = _metrics(side.logits[case], want)
            side.release()
        del want
        return_freed_memory()
    out = {name: {"cases": cases[name], "total": _merge(list(cases[name].values())), "greedy_match": None}
           for name in sides}
    if greedy_logits is not None:
        side = out[generated[0]]
        side["greedy_match"], side["greedy_ties"] = _greedy_match(sides[generated[0]].greedy, greedy_logits,
                                                                  tie=2 * side["total"]["max_abs"])
    return out


def _greedy_match(got: list[list[int]], want: list[torch.Tensor], tie: float) -> tuple[float, int]:
    """Share of the reference's greedy tokens the artifact reproduced, from the reference's logits
    want[b] [len(got[b]), V] teacher-forced on the artifact's own continuation got[b] (up to the
    first token where they part, the two continuations are the same sequence, so these are the
    logits the reference's own greedy decoding sees). Where they part, and the reference's logit
    for the artifact's token is within `tie` (twice the measured max |Δlogit|) of its top-1, the two
    logits were tied within the measured error: the rest of that row counts as matched (the
    sequences then legitimately differ) and the tie is reported, not failed."""
    matched = total = ties = 0
    for row, logits in zip(got, want):
        total += len(row)
        for j, x in enumerate(row):
            step = logits[j].double()
            if x != int(step.argmax()):
                if float(step.max() - step[x]) <= tie:
                    ties += 1
                    matched += len(row) - j
                break
            matched += 1
    return (matched / total if total else 1.0), ties


def noise_floor(reference, prompts: str = "full", seed: int = 0) -> dict:
    """How far a last-bit difference at every activation quantizer's input moves the emulating
    `reference`'s logits on the `prompts` set: the reference under `formats.last_bit_noise` vs itself,
    teacher-forced. The yardstick of the `quantized-activations` gate (see qwen35c.targets.GATES)."""
    plan = prompt_plan(reference.config.vocab_size, **PROMPT_SETS[prompts])
    return against(reference, {"floor": _noisy(reference, plan, seed)})["floor"]["total"]


def floor_seeds(config) -> int:
    """Noisy recordings the floor is the worst of. A routed-expert model's floor is heavy-tailed: a
    last-bit flip that changes a token's top-k experts jumps its logits, and a prompt where that
    cascades dominates the mean. Measured on qwen35-tiny-moe, cpu-int4 with int8 activations and
    the 8-bit shared head, full prompt set: the floor over seeds 0-5 is 1.23, 4.59, 1.86, 1.07, 1.16,
    1.74e-4 KL (max |dlogit| 0.3-1.6), and the artifact 5.03e-4 (one such cascade, at T=127): one
    draw against twice another is a coin toss there. Dense models' floors are tight (qwen35-tiny,
    FP8 block-128: 2.8-3.2e-4 over 3 seeds): one recording each."""
    return 3 if config.is_moe else 1


def _worst(floors: list[dict]) -> dict:
    """The floor of several noisy recordings: the one with the largest mean KL, with the lowest top-1
    of all of them."""
    worst = dict(max(floors, key=lambda f: f["kl_mean"]))
    worst.update(top1=min(f["top1"] for f in floors), recordings=len(floors))
    return worst


def _noisy(reference, plan: PromptPlan, seed: int) -> Recording:
    from qwen35c.quant.formats import last_bit_noise

    with last_bit_noise(torch.Generator().manual_seed(seed)):
        return record_teacher_forced(reference, plan)


def judge(recorded: Recording, reference, precision: str) -> tuple[dict, bool, list[str]]:
    """The artifact's `recorded` run against `reference` and the gate's verdict; where the gate
    needs the noise floor, the reference's noisy twin is recorded first and compared in the same
    pass (two passes over a streamed reference in all)."""
    sides = {"artifact": recorded}
    if precision == "quantized-activations":
        for seed in range(floor_seeds(reference.config)):
            sides[f"floor {seed}"] = _noisy(reference, recorded.plan, seed)
    results = against(reference, sides)
    result = results.pop("artifact")
    if results:
        result["floor"] = _worst([side["total"] for side in results.values()])
    ok, failures = gate(result["total"], precision, result["greedy_match"], result.get("floor"))
    return result, ok, failures


def compare(artifact, reference, *, single=SINGLE_LENGTHS, batch=BATCH_LENGTHS, steps=DECODE_STEPS,
            seed: int = 0) -> dict:
    """Both sessions on a prompt set (`record`, then `against`): per-case metrics, totals, greedy match."""
    plan = prompt_plan(reference.config.vocab_size, single, batch, steps, seed)
    return against(reference, {"artifact": record(artifact, plan)})["artifact"]


def parity(artifact, reference, precision: str, prompts: str = "full") -> tuple[dict, bool, list[str]]:
    """`compare` on a prompt set and the gate's verdict (with the noise floor where the gate needs it)."""
    plan = prompt_plan(reference.config.vocab_size, **PROMPT_SETS[prompts])
    return judge(record(artifact, plan), reference, precision)


def quick_parity(recorded: Recording, reference, precision: str, against_what: str = "reference") -> dict:
    """The build's own check: the artifact's `recorded` run of a prompt set (`record`; the artifact
    may be gone) against `reference` (the checkpoint's fp32 reference, or the quantization-emulating
    one for quantized builds, named by `against_what`); numbers rounded so builds stay byte-identical."""
    result, ok, failures = judge(recorded, reference, precision)
    rounded = {key: {k: (float(f"{v:.2g}") if isinstance(v, float) else v) for k, v in result[key].items()}
               for key in ("total", "floor") if key in result}
    summary = "pass" if ok else "; ".join(failures)
    out = {"status": "pass" if ok else "fail", "passed": ok, "by": "build", "precision": precision,
           "prompts": recorded.plan.describe(), "metrics": rounded["total"],
           "greedy_match": result["greedy_match"], "summary": summary}
    if "floor" in rounded:
        out["noise_floor"] = rounded["floor"]
    if against_what != "reference":
        out["against"] = against_what
    return out


# quantization loss is measured teacher-forced on natural held-out text (random ids make top-1 meaningless)
LOSS_TOKENS = 4096
LOSS_CONTEXT = 256


def heldout_ids(tokenizer, max_tokens: int = LOSS_TOKENS) -> tuple[list[int], str] | None:
    """Token ids of the held-out text (the stdlib files the bundled models never trained on,
    `reference.corpus.HELD_OUT`, from this interpreter) and its description; None if absent."""
    import sysconfig

    from qwen35c.eval.perplexity import encode_text
    from reference.corpus import HELD_OUT

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in HELD_OUT if (root / name).is_file()]
    if not files:
        return None
    text = "".join(f.read_bytes().decode("utf-8", errors="replace") for f in files)
    ids = encode_text(tokenizer, text)[: max_tokens + 1]
    return ids, f"held-out stdlib files ({', '.join(HELD_OUT)}), first {len(ids) - 1} tokens"


WINDOW_LOGITS_BYTES = 512 << 20   # logits held per model and pass in quantization_loss


def quantization_loss(full, emulated, ids: list[int], context: int = LOSS_CONTEXT) -> dict:
    """Teacher-forced KL(full || emulated), top-1 agreement and perplexity ratio over `ids`
    (windows of `context` tokens, like `qwen35c perplexity --kl-base`). The windows go through the
    models in groups whose logits fit WINDOW_LOGITS_BYTES (a 248K vocabulary: two windows a pass)."""
    from qwen35c.eval.perplexity import windows

    all_ids = torch.tensor(ids, dtype=torch.long)
    spans = list(windows(len(ids), context, context))
    per_group = max(1, WINDOW_LOGITS_BYTES // (4 * context * full.config.vocab_size))
    parts = []
    for first in range(0, len(spans), per_group):
        group = spans[first:first + per_group]
        inputs = [all_ids[None, w.begin:w.end] for w in group]
        for w, want, got in zip(group, _window_logits(full, inputs), _window_logits(emulated, inputs)):
            rows = torch.arange(w.target_begin - 1, w.target_end - 1) - w.begin
            parts.append(_metric_parts(got[0, rows].float(), want[0, rows].float(),
                                       all_ids[w.target_begin:w.target_end]))
    metrics = _reduce(parts)
    n = metrics["positions"]
    metrics["ppl_ratio"] = math.exp((sum(p["nll_got"] for p in parts) - sum(p["nll_want"] for p in parts)) / n)
    return metrics


def _window_logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of each window; a streamed reference runs them all in one pass over its layers."""
    with torch.no_grad():
        if hasattr(model, "forward_many"):
            from reference.stream import Batch

            return model.forward_many([Batch(x) for x in inputs])
        return [model(x) for x in inputs]


from qwen35c.targets import lowering_gate  # noqa: E402  (re-exported: the gate of artifact vs emulation)


def _prepare(manifest: dict, ref_path: Path, checks: list[dict], report: dict, say):
    """The packed weights of a quantized artifact, recomputed from the reference checkpoint; None
    (and the parity check recorded as not run) when the digest differs from the artifact's."""
    from qwen35c.quant.build import prepare

    record = manifest["quantization"]
    say(f"rebuilding the quantization-emulating reference ({record['label']})")
    prepared = prepare(ref_path, record)
    report["quantization"] = {"label": record["label"], "precision": record["precision"],
                              "lowering_gate": lowering_gate(record),
                              "packed_sha256": {"artifact": record["packed_sha256"],
                                                "reproduced": prepared.record["packed_sha256"]}}
    if prepared.record["packed_sha256"] == record["packed_sha256"]:
        return prepared
    checks.append({"name": "parity", "status": "not run",
                   "detail": "the quantization-emulating reference could not be reproduced (packed-weight "
                             "digest differs from the manifest's: another torch build or CPU?); artifact "
                             "vs emulation not compared"})
    return None


def _parity(recorded: Recording, backend, manifest: dict, ref_path: Path, prepared, mode: str | None,
            checks: list[dict], report: dict, say, prompts: str = "full"):
    """The artifact's recorded run vs the reference its backend says it must match (the fp32
    reference, or an emulating one: quantized weights, bf16-rounded weights), at that reference's gate."""
    reference, precision, against_what = backend.reference(ref_path, manifest, prepared, mode)
    say(f"parity: the {against_what} on the same positions")
    result, ok, failures = judge(recorded, reference, precision)
    report["parity"] = dict(result, against=against_what, gate=precision,
                            limits=limits_of(precision, result.get("floor")), prompts=prompts)
    checks.append({"name": "parity", "status": "pass" if ok else "fail",
                   "detail": f"artifact vs {against_what}: " + (f"within the {precision} gate" if ok else "; ".join(failures))})


def _quantization_loss(manifest: dict, ref_path: Path, prepared, checks: list[dict], report: dict,
                       skip: tuple[str, ...], say) -> None:
    """The emulation vs the full-precision reference on held-out text, at the recipe's gate."""
    from qwen35c.runtime.session import load_tokenizer
    from qwen35c.targets import GATES

    record = manifest["quantization"]
    if "quantization" in skip:
        checks.append({"name": "quantization", "status": "skipped", "detail": "--skip quantization"})
        return
    if prepared is None:
        checks.append({"name": "quantization", "status": "not run",
                       "detail": "the quantized weights could not be reproduced (see parity)"})
        return
    tokenizer = load_tokenizer(ref_path)
    text = heldout_ids(tokenizer) if tokenizer is not None else None
    if text is None:
        checks.append({"name": "quantization", "status": "not run",
                       "detail": f"{ref_path}: no tokenizer.json (or no held-out text) to measure the quantization "
                                 f"loss on; --skip quantization to verify without it"})
        return
    ids, described = text
    say(f"quantization loss on {described}")
    metrics = quantization_loss(prepared.model, prepared.emulated(), ids)
    precision = record["precision"]
    ok, failures = gate(metrics, precision, None)
    report["quantization"].update(text=described, metrics=metrics, gate=GATES[precision])
    checks.append({"name": "quantization", "status": "pass" if ok else "fail",
                   "detail": (f"{record['label']} emulation vs full precision (quantization loss): mean KL "
                              f"{metrics['kl_mean']:.2e}, p99 {metrics['kl_p99']:.2e}, top-1 {metrics['top1']:.4f}, "
                              f"ppl x{metrics['ppl_ratio']:.4f}; "
                              + (f"within the {precision} gate" if ok else "; ".join(failures)))})


SKIPPABLE = ("quantization", "speculative", "mtp", "bisect")
SPECULATIVE_TOLERANCE = 1e-4   # |Δ| of states / logits, a K+1-token step against 1-token steps (fp32 rounding)


def _quantizes_activations(manifest: dict) -> bool:
    record = manifest.get("quantization")
    return bool(record) and (record.get("recipe") or {}).get("activations", "none") != "none"


def _speculative(artifact, checks: list[dict], report: dict, seed: int = 0) -> None:
    """Speculative decoding's three claims, on the batch prompts (rows committing 1, 3 and 0 tokens):
      drafts leave no trace  two verify steps that differ only in their drafts leave the same states
                             and committed-position logits: bit-identical where every kernel treats
                             tokens independently (measured 0 on dense graphs, fp32 and int8
                             activations); ORT's QMoE groups tokens by expert, so there the drafts
                             change the committed tokens' round-off (1.5e-7 measured): within the
                             tolerance below;
      commit = fewer tokens  the next logits after a verify step equal those after a step over the
                             committed tokens alone, within SPECULATIVE_TOLERANCE or, for artifacts
                             that quantize activations at run time (an int8 rounding flips on a 1e-7
                             change), the larger of twice the artifact's own path noise (the same
                             committed tokens fed one per step instead of in one step) and its
                             measured max |Δ| against the emulating reference (parity);
      greedy unchanged       speculative greedy == plain greedy (K = 1..3; perfect, noisy and
                             always-wrong drafts). Where they part at a logit tie within twice the
                             tolerance, the tie is reported, not failed."""
    from qwen35c.runtime.speculative import Replay

    gen = torch.Generator().manual_seed(seed)
    vocab = artifact.config.vocab_size
    lengths = list(BATCH_LENGTHS)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    steps, rows = 4, len(prompts)
    new = torch.randint(0, vocab, (rows, steps), generator=gen)
    take, commit = torch.tensor([steps, steps - 1, 2][:rows]), torch.tensor([1, steps - 1, 0][:rows])
    other = new.clone()
    for b, c in enumerate(commit.tolist()):       # the same committed tokens, other drafts
        other[b, c:] = torch.randint(0, vocab, (steps - c,), generator=gen)
    probe = torch.randint(0, vocab, (rows, 1), generator=gen)

    def prefilled():
        state = artifact.new_state(rows, max(lengths) + steps + 1)
        ids = torch.zeros(rows, max(lengths), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)
        artifact.prefill(ids, state, torch.tensor(lengths), last_only=True)
        return state

    spec, twin, kept, stepped = (prefilled() for _ in range(4))
    first = artifact.extend(new, spec, take, commit)
    second = artifact.extend(other, twin, take, commit)
    traces = max(float((first[b, :int(c)] - second[b, :int(c)]).abs().max()) if c else 0.0
                 for b, c in enumerate(commit.tolist()))
    after = artifact.decode(probe, spec)
    traces = max(traces, float((after - artifact.decode(probe, twin)).abs().max()))
    artifact.prefill(new[:, :int(commit.max())], kept, commit)
    kept_next = artifact.decode(probe, kept)
    state_delta = float((after - kept_next).abs().max())
    for t in range(int(commit.max())):
        artifact.prefill(new[:, t:t + 1], stepped, (commit > t).long())
    noise = float((artifact.decode(probe, stepped) - kept_next).abs().max())
    quantized = _quantizes_activations(getattr(artifact, "manifest", {}))
    lowering = float(report.get("parity", {}).get("total", {}).get("max_abs", 0.0))
    tolerance = max(SPECULATIVE_TOLERANCE, 2 * noise, lowering) if quantized else SPECULATIVE_TOLERANCE
    plain = artifact.generate(prompts, 12, keep_logits=True)
    mismatched = ties = 0
    for k, err in ((1, 0.0), (2, 0.3), (3, 1.0)):
        got = artifact.generate(prompts, 12, speculative=k,
                                drafter=Replay(prompts, plain.tokens, err, vocab, seed + k)).tokens
        parted = _parted(prompts, plain, got, 2 * tolerance)
        mismatched, ties = mismatched + parted[0], ties + parted[1]
    ok = traces <= tolerance and state_delta <= tolerance and not mismatched
    report["speculative"] = {"draft_traces": traces, "state_delta": state_delta, "path_noise": noise,
                             "tolerance": tolerance, "rows": 3 * rows, "mismatched": mismatched, "ties": ties}
    checks.append({"name": "speculative", "status": "pass" if ok else "fail",
                   "detail": f"drafts leave no trace (two steps differing only in drafts: max |Δ| {traces:.1e}); "
                             f"a verify step keeps the committed tokens' state (next logits max |Δ| "
                             f"{state_delta:.1e}); limit {tolerance:.1e}"
                             + (" from this artifact's own noise: activations quantized at run time"
                                if tolerance > SPECULATIVE_TOLERANCE else "")
                             + f"; speculative greedy == plain greedy on {3 * rows - mismatched}/{3 * rows} rows (K = 1..3, drafts perfect, noisy, always wrong; {ties} ties)"})


def _parted(prompts, plain, got: list[list[int]], tie: float) -> tuple[int, int]:
    """(rows of `got` that part from plain greedy decoding, rows that part at a logit tie within
    `tie` of plain's argmax); `plain` was generated with keep_logits."""
    mismatched = ties = 0
    for b, (x_row, y_row) in enumerate(zip(got, plain.tokens)):
        j = next((j for j, (x, y) in enumerate(zip(x_row, y_row)) if x != y), None)
        if j is None:
            continue
        logits = plain.logits[b][len(prompts[b]) - 1 + j].astype(np.float64)
        if float(logits.max() - logits[x_row[j]]) <= tie:
            ties += 1
        else:
            mismatched += 1
    return mismatched, ties


def _mtp_head(artifact, reference, checks: list[dict], report: dict, quantized_activations: bool) -> None:
    """The `mtp` check (module docstring), at the fp32 gate's max |Δlogit| (the ONNX CPU targets
    compute in fp32; measured ~5e-6 on the bundled models): the head's own linears stay fp32 in
    every recipe. Its LM head is the model's, so with activations quantized at run time its logits
    get the parity check's measured max |Δ| as their limit, like `_speculative`'s. `artifact` is the
    model joined with its head (`drafting`), which speculative decoding with the head runs: its
    head states and draft are checked too, and MTP-drafted greedy decoding against plain."""
    from qwen35c.targets import GATES

    head = artifact.draft_head()
    mtp = reference.load_mtp()
    gen = torch.Generator().manual_seed(1)
    vocab, worst_logits, worst_hidden, worst_split = artifact.config.vocab_size, 0.0, 0.0, 0.0
    worst_joined, wrong_drafts = 0.0, 0
    lowering = float(report.get("parity", {}).get("total", {}).get("max_abs", 0.0))
    gate = GATES["fp32"]["max_abs_logit"]
    limit = max(gate, lowering) if quantized_activations else gate
    for n in BATCH_LENGTHS:
        ids = torch.randint(0, vocab, (1, n + 1), generator=gen)
        main, out = artifact.prefill(ids[:, :n], artifact.new_state(1, n), extras=True)
        hidden = out["hidden"]
        with torch.no_grad():
            want_hidden = mtp(hidden, reference.embed(ids[:, 1:]), torch.arange(1, n + 1)[None])
            want = reference.edges()[2](want_hidden[:, -1]).float()[0]
            # the joined graph's last pair reads the model's argmax as its token: its draft
            after = torch.cat([ids[:, 1:n], main[:, -1].argmax(-1, keepdim=True)], 1)
            draft = reference.edges()[2](mtp(hidden, reference.embed(after), torch.arange(1, n + 1)[None])[:, -1])[0]
            draft = draft[:artifact.draft_vocab or None]      # QWEN35C_DRAFT_VOCAB: the first ids only
        logits, got_hidden = head.draft_step(ids[:, 1:], hidden, head.new_state(1, n), [0], [n])
        want = want[:logits.shape[-1]]       # a draft vocabulary cuts the head's logits to the first ids
        worst_logits = max(worst_logits, float((torch.from_numpy(logits[0]) - want).abs().max()))
        worst_hidden = max(worst_hidden, float((torch.from_numpy(got_hidden) - want_hidden).abs().max()))
        worst_joined = max(worst_joined, float((out["mtp_hidden"][:, :n - 1] - want_hidden[:, :n - 1]).abs().max())
                           if n > 1 else 0.0)
        wrong_drafts += float(draft.max() - draft[int(out["draft"][0, -1])]) > 2 * limit
        state, cut = head.new_state(1, n), n // 2     # the same pairs over two steps: the head's KV cache
        if cut:
            head.draft_step(ids[:, 1:cut + 1], hidden[:, :cut], state, [0], [cut])
        split, _ = head.draft_step(ids[:, cut + 1:], hidden[:, cut:], state, [cut], [n - cut])
        worst_split = max(worst_split, float(np.abs(split - logits).max()))
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in BATCH_LENGTHS]
    plain = artifact.generate(prompts, 12, keep_logits=True)
    mismatched = ties = 0
    for k in (1, 2):
        parted = _parted(prompts, plain, artifact.generate(prompts, 12, speculative=k, drafter="mtp").tokens,
                         2 * max(SPECULATIVE_TOLERANCE, limit if quantized_activations else 0.0))
        mismatched, ties = mismatched + parted[0], ties + parted[1]
    ok = max(worst_hidden, worst_joined) <= gate and worst_logits <= limit and worst_split <= limit
    ok = ok and not wrong_drafts and not mismatched
    report["mtp"] = {"max_abs_logits": worst_logits, "max_abs_hidden": worst_hidden, "max_abs_split": worst_split,
                     "max_abs_joined_hidden": worst_joined, "wrong_drafts": wrong_drafts,
                     "greedy_mismatched": mismatched, "greedy_ties": ties, "limit": limit}
    checks.append({"name": "mtp", "status": "pass" if ok else "fail",
                   "detail": f"MTP head vs the reference MTP on {len(BATCH_LENGTHS)} prompts: hidden states max |Δ| "
                             f"{worst_hidden:.1e} (joined with the model {worst_joined:.1e}; limit {gate:.0e}), last "
                             f"logits {worst_logits:.1e}, fed in two steps vs one {worst_split:.1e} (limit {limit:.1e}); "
                             f"joined drafts off the reference's argmax: {wrong_drafts}"
                             + (f" (draft vocabulary: the first {artifact.draft_vocab} ids)" if artifact.draft_vocab else "")
                             + "; MTP-drafted greedy == plain "
                             f"greedy on {2 * len(prompts) - mismatched}/{2 * len(prompts)} rows (K = 1, 2; {ties} ties)"})


def source_checkpoint(directory: Path, manifest: dict, reference: str | Path | None = None, say=print) -> Path:
    """The checkpoint an artifact was built from (`reference`, or the manifest's source path), read
    only after every file the manifest recorded for it hashes as recorded."""
    from qwen35c.artifact import ArtifactError, sha256_file

    ref_path = Path(reference) if reference else Path(manifest["source"]["path"])
    if not reference and not manifest["source"]["path"]:
        raise ArtifactError(f"{directory}: the manifest names no source checkpoint; pass --reference DIR")
    if not (ref_path / "config.json").is_file():
        raise ArtifactError(f"{ref_path}: reference checkpoint missing (no config.json); pass --reference DIR")
    say(f"hashing the reference checkpoint {ref_path}")
    mismatched = [n for n, h in sorted(manifest["source"]["files"].items())
                  if not (ref_path / n).is_file() or sha256_file(ref_path / n, follow=True) != h]
    if mismatched:
        raise ArtifactError(f"{ref_path / mismatched[0]}: differs from the checkpoint the artifact was built from")
    return ref_path


def verify_artifact(directory: str | Path, reference: str | Path | None = None, bisect: bool = False,
                    threads: int | None = None, structure_only: bool = False, skip: tuple[str, ...] = (),
                    progress=None, prompts: str = "full") -> dict:
    """The full verification; raises ArtifactError (exit 2) on bad input, returns the report.

    report["status"]: "pass" (the artifact was executed and every check that ran passed), "fail"
    (a check failed: exit 1) or "incomplete" (a check could not run: exit 2, with the reason).
    `structure_only` checks the manifest, files and reference without executing the artifact (its
    status says so); `skip` names checks the caller does not want (reported as skipped); `prompts`
    picks the parity prompt set (PROMPT_SETS; the report records it)."""
    from qwen35c.runtime import open_checked
    from qwen35c.targets import get_target, runnable_here

    say = progress or (lambda message: None)
    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        raise QwenError(f"--skip {unknown[0]}: not a skippable check ({', '.join(SKIPPABLE)})")
    directory = Path(directory)
    checks: list[dict] = []
    say("checking the manifest and hashing every file")
    manifest, backend = open_checked(directory)
    checks.append({"name": "manifest", "status": "pass",
                   "detail": f"schema {manifest['schema_version']}, {len(manifest['files'])} files hash as recorded"})
    target = get_target(manifest["target"]["name"])
    ref_path = source_checkpoint(directory, manifest, reference, say)
    checks.append({"name": "reference", "status": "pass", "detail": f"{ref_path} matches the source hashes"})
    quantized = manifest.get("quantization")
    report = {"artifact": str(directory), "target": target.name,
              "precision": quantized["precision"] if quantized else target.precision,
              "checks": checks, "status": None, "passed": None}
    if structure_only:
        checks.append({"name": "execution", "status": "skipped",
                       "detail": "--structure-only: the artifact was not executed, no parity checked"})
        return _finish(report, structure_only=True)
    runnable, why = runnable_here(target, manifest["backend"]["name"])
    checks.append({"name": "target", "status": "pass" if runnable else "not run", "detail": why})
    if not runnable:
        checks.append({"name": "parity", "status": "not run", "detail": why})
        return _finish(report)
    blocker = _memory(directory, manifest, report)
    if blocker:
        checks.append({"name": "parity", "status": "not run", "detail": blocker})
        return _finish(report)
    prepared = _prepare(manifest, ref_path, checks, report, say) if quantized else None
    # The artifact runs first and alone; its logits are recorded and it is dropped before a reference
    # runs, so verify holds the larger of the two, never both (see `record`)
    say(f"loading the artifact ({manifest['backend']['name']})")
    artifact = backend.load(directory, manifest, threads=threads, lean=True)
    report["mode"] = getattr(artifact, "mode", None)
    speculative, drafts = artifact.extends, getattr(artifact, "drafts", False)
    recorded = None
    if prepared is not None or not quantized:
        say(f"parity: running the artifact on the {prompts} prompt set")
        recorded = record(artifact, prompt_plan(artifact.config.vocab_size, **PROMPT_SETS[prompts]))
    del artifact
    return_freed_memory()
    if recorded is not None:
        _parity(recorded, backend, manifest, ref_path, prepared, report["mode"], checks, report, say, prompts)
    if quantized:
        _quantization_loss(manifest, ref_path, prepared, checks, report, skip, say)
    if manifest["engine"]["status"] == "not built":     # a stage-1 TensorRT bundle: the check above is its CPU check
        checks.append({"name": "engine", "status": "skipped",
                       "detail": f"not built, so not verified: {manifest['engine'].get('detail', '')}"})
    if prepared is not None:
        prepared.release()      # the references have run: their packed pages (an 8-bit head's) go
    if "speculative" in skip:
        checks.append({"name": "speculative", "status": "skipped", "detail": "--skip speculative"})
    elif speculative:
        say("speculative decoding: commit step and greedy equality")
        _speculative(backend.load(directory, manifest, threads=threads, lean=True), checks, report)
        return_freed_memory()
    if "mtp" in skip:
        checks.append({"name": "mtp", "status": "skipped", "detail": "--skip mtp"})
    elif drafts and quantized and prepared is None:
        checks.append({"name": "mtp", "status": "not run",
                       "detail": "the quantization-emulating reference (the head's LM head) could not be rebuilt"})
    elif drafts:
        from reference.stream import StreamedModel

        say("MTP head against the reference MTP module")
        reference = prepared.emulated() if prepared is not None else StreamedModel(ref_path, torch.float32)
        try:
            _mtp_head(backend.load(directory, manifest, threads=threads, lean=True, drafting=True), reference, checks,
                      report, _quantizes_activations(manifest))
        except QwenError as err:   # a graph that does not run is a failed check, reported as such
            checks.append({"name": "mtp", "status": "fail", "detail": f"the head could not run: {err}"})
    if bisect and "bisect" in skip:
        raise QwenError("--bisect and --skip bisect contradict each other")
    if bisect and quantized:
        checks.append({"name": "bisect", "status": "not run",
                       "detail": "bisect compares every pass with the full-precision model; a quantized "
                                 "pipeline is checked by the parity / quantization checks instead"})
    elif bisect:
        say("bisect: interpreting the IR after every pass")
        failed = any(c["name"] == "parity" and c["status"] == "fail" for c in checks)
        report["bisect"] = run_bisect(manifest, ref_path, artifact_failed=failed)
        checks.append({"name": "bisect", "status": "pass" if report["bisect"]["first_broken"] is None else "fail",
                       "detail": f"first broken: {report['bisect']['first_broken'] or 'none'}"})
    return _finish(report)


def _memory(directory: Path, manifest: dict, report: dict) -> str | None:
    """verify's estimated peak RSS in the report (ONNX CPU artifacts: `memory.verify_peak`), and why it
    cannot run on this machine (None: it fits, or no estimate exists for this backend)."""
    if manifest["backend"]["name"] != "onnx":
        return None
    from qwen35c.memory import available_bytes, shortfall, verify_peak
    from reference.config import load_config

    record = manifest.get("quantization")
    estimate = verify_peak(load_config(directory), "int4" if record and record["precision"] == "int4" else "fp32",
                           record is not None)
    report["memory"] = {"estimated_peak_bytes": estimate.total, "phases_bytes": estimate.parts,
                        "available_bytes": available_bytes()}
    phases = ", ".join(f"{name.replace('_', ' ')} ~{size / 2**30:.1f}" for name, size in estimate.parts.items())
    return shortfall(estimate.total, f"verify (its phases, one after the other, in GiB: {phases})")


def _finish(report: dict, structure_only: bool = False) -> dict:
    statuses = [c["status"] for c in report["checks"]]
    if "fail" in statuses:
        report["status"] = "fail"
    elif "not run" in statuses:
        report["status"] = "incomplete"
    else:
        report["status"] = "structure-only" if structure_only else "pass"
    report["passed"] = report["status"] in ("pass", "structure-only")
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


__all__ = ["ParityFailure", "compare", "gate", "heldout_ids", "quantization_loss", "lowering_gate", "quick_parity", "run_bisect",
           "source_checkpoint",
           "verify_artifact"]
