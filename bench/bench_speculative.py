"""Speculative decoding on onnx artifacts (not a test): what a verify step costs, and what it buys.

    python bench/bench_speculative.py ART [ART ...] [--threads 2] [--context 512] [--new 128]
        [--prompts 4] [--k 1,2,3] [--drafters mtp,lookup] [--repeats 3] [--alpha 0.9] [--json OUT]

QWEN35C_DRAFT_VOCAB=N in the environment gives the joined head a draft vocabulary (README).

For each artifact, in one process, measurements interleaved across repeats (medians):
  step cost   a 1-token decode step against a T-token verify step (commit 1, the rest drafts) for
              T = 2 .. 2K+1 at a CONTEXT-token state: the ratio c(T) decides every speedup below;
              for an artifact with an MTP head, the same steps of the model joined with its head
              (each step also drafts the next token: c_mtp(T)), and one draft step of the head run
              alone (ratio d: chained drafts 2..K).
  generation  NEW greedy tokens after each of PROMPTS CONTEXT-token prompts, plain and with
              `speculative=K` for each drafter (`mtp`: the artifact's MTP head; `lookup`: prompt
              lookup): decode tok/s over the prompts (drafting included), drafts accepted /
              proposed, tokens per weight pass (= per step), the ratio to plain, and whether the
              tokens equal plain decoding's. A round runs plain and every configuration in turn;
              the ratio is the median over rounds of each round's ratio to that round's plain
              run, so a machine that drifts between rounds moves both sides of a ratio alike.
              The prompts are windows spread over the held-out text through the artifact's
              tokenizer when it has one (a trained model, real acceptance), else random ids
              (random weights: acceptance ~0).
  projection  for a per-draft acceptance ALPHA (independent drafts), a step with K drafts yields
              E[m] = (1 - ALPHA^(K+1)) / (1 - ALPHA) tokens and feeds T = E[m] + K tokens (the last
              step's E[m] tokens come back as pending): speedup = E[m] / c(T), c interpolated from
              the measured step costs; with the MTP head, the joined step's cost plus the chained
              drafts' K - 1 draft steps: speedup = E[m] / (c_mtp(T) + (K - 1) d). The default ALPHA 0.9 is the order of the ~93 % reported for
              Qwen3-Next's MTP head (ROCm ATOM, ../shared/notes/peers.md §4.11), a published
              model's head; the bundled tiny models' heads reach ~55 %.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np
import torch


def step_costs(sessions: dict, context: int, widths: list[int], repeats: int, rng) -> dict[str, dict[int, float]]:
    """Median seconds of a decode step (T = 1) and of extend steps of each width (commit 1), for each
    session (the model alone, and joined with its MTP head): widths interleaved, sessions in turns of
    20 rounds (a session's threads spin-wait a while after its run: two sessions interleaved step by
    step slow each other down, which no generation does)."""
    vocab = next(iter(sessions.values())).config.vocab_size
    states = {}
    for name, session in sessions.items():
        states[name] = session.new_state(1, context + repeats * 40 * (sum(widths) + 1) + 64)
        session.prefill(torch.from_numpy(rng.integers(0, vocab, (1, context))), states[name], last_only=True)
    times = {name: {1: [], **{t: [] for t in widths}} for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            for _, t in itertools.product(range(20), times[name]):
                ids = torch.from_numpy(rng.integers(0, vocab, (1, t)))
                start = time.perf_counter()
                if t == 1:
                    session.decode(ids, states[name])
                else:
                    session.extend(ids, states[name], np.array([t]), np.array([1]))
                times[name][t].append(time.perf_counter() - start)
    return {name: {t: statistics.median(v) for t, v in by_width.items()} for name, by_width in times.items()}


def draft_cost(head, context: int, repeats: int, rng) -> float:
    """Median seconds of one MTP draft step (one pair) after CONTEXT pairs."""
    hidden = rng.standard_normal((1, context, head.config.hidden_size)).astype(np.float32)
    ids = rng.integers(0, head.config.vocab_size, (1, context))
    state = head.new_state(1, context + 1)
    head.draft_step(ids, hidden, state, [0], [context])
    times = []
    for _ in range(repeats * 20):
        start = time.perf_counter()
        head.draft_step(ids[:, :1], hidden[:, :1], state, [context], [1])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_ids(session, context: int, rng, count: int = 1) -> tuple[list[list[int]], str]:
    """`count` prompts of `context` tokens: windows spread evenly over the held-out text where the
    artifact has a tokenizer and the text is long enough, else random ids."""
    from qwen35c.verify import heldout_ids

    if session.tokenizer is not None:
        found = heldout_ids(session.tokenizer, max_tokens=1 << 30)
        if found is not None and len(found[0]) >= count * context:
            ids, stride = found[0], len(found[0]) // count
            return ([ids[i * stride:i * stride + context] for i in range(count)],
                    f"{count} windows of {context} tokens spread over the held-out stdlib files")
    return [rng.integers(0, session.config.vocab_size, context).tolist() for _ in range(count)], "random ids"


def decode_rate(results) -> float:
    """Decode tok/s over a round's generations (one per prompt)."""
    return sum(r.decode_tokens_per_second * r.decode_seconds for r in results) / sum(r.decode_seconds for r in results)


def projection(costs: dict[int, float], k: int, alpha: float, plain: float, drafter: str, draft: float = 0.0) -> dict:
    """Speedup over plain decoding (a step of `plain` seconds) of steps costing `costs` by width."""
    widths = sorted(costs)
    expected = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    width = expected + k
    ratio = float(np.interp(width, widths, [costs[t] / plain for t in widths])) + (k - 1) * draft / plain
    return {"drafter": drafter, "k": k, "alpha": alpha, "tokens_per_step": expected, "step_tokens": width,
            "step_cost": ratio, "speedup": expected / ratio, "extrapolated": width > widths[-1]}


def bench(path: str, args) -> dict:
    from qwen35c.runtime import load
    from qwen35c.runtime.speculative import PromptLookup

    session = load(path, threads=args.threads)
    if not session.extends:
        raise SystemExit(f"{path}: no commit step (rebuild the artifact)")
    rng = np.random.default_rng(0)
    ks = [int(k) for k in args.k.split(",")]
    head = session.draft_head() if session.drafts else None
    sessions = {"plain": session, **({"mtp": session.drafting()} if head is not None else {})}
    measured = step_costs(sessions, args.context, list(range(2, 2 * max(ks) + 2)), args.repeats, rng)
    costs = measured["plain"]
    draft = draft_cost(head, args.context, args.repeats, rng) if head is not None else 0.0
    factories = {"mtp": lambda: "mtp", "lookup": PromptLookup}
    drafters = [d for d in args.drafters.split(",") if d != "mtp" or head is not None]
    prompts, source = prompt_ids(session, args.context, rng, args.prompts)
    runs: dict[tuple, list] = {(None, 0): [], **{(d, k): [] for d in drafters for k in ks}}
    for _ in range(args.repeats):   # a round: every configuration over every prompt
        for d, k in runs:
            runs[d, k].append([session.generate([p], args.new, speculative=k, drafter=factories[d]() if d else None)
                               for p in prompts])
    plain = [r.tokens for r in runs[None, 0][0]]
    out = {"artifact": path, "mode": session.mode, "context": args.context, "new": args.new, "prompt": source,
           "threads": args.threads, "step_ms": {t: 1e3 * c for t, c in costs.items()},
           "step_ratio": {t: c / costs[1] for t, c in costs.items()},
           "mtp_step_ms": {t: 1e3 * c for t, c in measured["mtp"].items()} if head is not None else None,
           "mtp_draft_ms": 1e3 * draft if head is not None else None, "generation": [], "projection": []}
    base = [decode_rate(results) for results in runs[None, 0]]
    for (d, k), rounds in runs.items():
        first = rounds[0]    # greedy: every round drafts and accepts the same
        steps = sum(r.decode_steps for r in first)
        rates = [decode_rate(results) for results in rounds]
        out["generation"].append({
            "drafter": d, "k": k, "decode_tokens_per_second": statistics.median(rates),
            "ratio": statistics.median(rate / b for rate, b in zip(rates, base)),
            "ratios": [rate / b for rate, b in zip(rates, base)], "steps": steps,
            "tokens_per_pass": sum(r.decode_tokens for r in first) / steps if k and steps else 1.0,
            "drafted": sum(r.drafted for r in first), "accepted": sum(r.accepted for r in first),
            "equal_to_plain": all([r.tokens for r in results] == plain for results in rounds)})
    out["projection"] = [projection(costs, k, args.alpha, costs[1], "lookup") for k in ks]
    if head is not None:
        out["projection"] += [projection(measured["mtp"], k, args.alpha, costs[1], "mtp", draft) for k in ks]
    return out


def show(result: dict) -> None:
    print(f"\n{result['artifact']} ({result['mode']}, {result['threads']} threads, context {result['context']}, "
          f"prompt: {result['prompt']})")
    print("  step cost: " + ", ".join(f"T={t} {ms:.2f} ms (x{result['step_ratio'][t]:.2f})"
                                      for t, ms in result["step_ms"].items()))
    if result["mtp_draft_ms"] is not None:
        base = result["step_ms"][1]
        print("  joined with the MTP head: " + ", ".join(f"T={t} {ms:.2f} ms (x{ms / base:.2f})"
                                                       for t, ms in result["mtp_step_ms"].items()))
        print(f"  MTP head alone (chained drafts): {result['mtp_draft_ms']:.2f} ms (x{result['mtp_draft_ms'] / base:.2f})")
    for g in result["generation"]:
        label = "plain" if not g["k"] else f"{g['drafter']} K={g['k']}"
        drafts = f", accepted {g['accepted']}/{g['drafted']}" if g["k"] else ""
        spread = f" (rounds x{min(g['ratios']):.2f}-{max(g['ratios']):.2f})" if g["k"] else ""
        print(f"  {label:12s} {g['decode_tokens_per_second']:8.1f} tok/s  x{g['ratio']:.2f}{spread}  "
              f"{g['tokens_per_pass']:.2f} tokens/pass{drafts}  tokens == plain: {g['equal_to_plain']}")
    for p in result["projection"]:
        print(f"  projected {p['drafter']} K={p['k']} at acceptance {p['alpha']}: {p['tokens_per_step']:.2f} tokens a step "
              f"of {p['step_tokens']:.1f} tokens costing x{p['step_cost']:.2f} -> x{p['speedup']:.2f}"
              + (" (step cost extrapolated)" if p["extrapolated"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help="prompts a round generates from")
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--drafters", default="mtp,lookup", help="mtp (where the artifact has a head), lookup")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = [bench(path, args) for path in args.artifacts]
    for r in results:
        show(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
