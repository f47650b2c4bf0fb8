"""Speculative decoding on any session with a commit step (`Session.extend`).

A step feeds each row's *pending* tokens (produced but not yet in the state: after the prefill its
first token, later the drafts the last step accepted and the model's own next token) followed by up
to K drafted tokens, in one pass over the weights:

    ids = pending + drafts        lengths = |pending| + |drafts|        commit = |pending|

The logits at the last pending position judge the first draft, the next position the second, and
so on. The state keeps only the pending tokens (`commit`), so a rejected draft needs no rollback:
the GDN conv and recurrent states never saw it and the next step, which starts at q_start + commit,
writes over its KV-cache positions. Accepted drafts are computed again in the next step as pending
tokens (at most K + 1 of them); that costs arithmetic, not weight reads, which bound decode on a CPU.

Greedy: drafts are accepted while each equals the argmax; the first mismatch is replaced by the
argmax, and when all are accepted the argmax after the last one is a bonus token. The tokens are
plain greedy decoding's, up to the fp32 rounding that differs between a K+1-token pass and
1-token passes (enough to flip an exact tie, nothing else).

Sampling: the speculative sampling rule (Leviathan et al., Chen et al., 2023). With the drafter's
distribution q, draft d is accepted with probability min(1, p(d) / q(d)); on rejection the token is
drawn from max(p - q, 0) renormalised. A drafter that gives no distribution is a point mass (accept
with p(d); on rejection draw from p without d). p is exactly what plain `generate` samples from
(temperature, then top-p), so the output distribution is plain sampling's.

Drafters: prompt lookup (`PromptLookup`, "lookup", the default), the model's own MTP head
(`MtpDrafter`, "mtp", on an artifact that compiled one: generation then runs on the model joined
with its head, `session.drafting()`, whose every step also drafts the next one) and `Replay` (tests
and `verify`). Prompt lookup stays the default: its drafts cost nothing, while the joined head costs
x1.3 of a step on the bundled models and x1.2-1.4 on the 0.8b preset (it reads the LM head again;
x1.2 with a draft vocabulary, QWEN35C_DRAFT_VOCAB), so on this CPU MTP drafting is about level with
plain decode even where ~80% of its drafts are accepted (the bundled models' distilled heads; README,
"Speculative decoding").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qwen35c.errors import QwenError
from qwen35c.runtime.generation import GenerationResult, choose, greedy, sample, sampling_probs


@dataclass
class Draft:
    tokens: list[int]
    probs: np.ndarray | None = None      # [len(tokens), V] the drafter's q, None for a point mass


class PromptLookup:
    """Drafts by prompt lookup (n-gram matching): the tokens that followed the most recent earlier
    occurrence of the context's last n tokens, longest n first. Free to run, and right whenever the
    output repeats its input (code edits, extraction, summaries quoting the source)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise QwenError(f"prompt lookup n-gram sizes {min_ngram}..{max_ngram} are not a range >= 1")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, contexts: list[list[int]], budgets: list[int]) -> list[Draft]:
        return [Draft(self._lookup(c, k) if k > 0 else []) for c, k in zip(contexts, budgets)]

    def _lookup(self, context: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for i in range(len(context) - n - 1, -1, -1):
                if context[i:i + n] == tail:
                    return context[i + n:i + n + k]
        return []


class Replay:
    """Drafts a known continuation of each prompt (e.g. plain greedy decoding's), each token replaced
    by a random one with probability `err`: `verify`'s and the tests' drafter, since equality with
    plain decoding must hold for perfect, noisy and always-wrong (err = 1) drafts alike."""

    def __init__(self, prompts: list[list[int]], continuations: list[list[int]], err: float, vocab: int, seed: int = 0):
        self.prompts, self.continuations, self.err, self.vocab = prompts, continuations, err, vocab
        self.rng = np.random.default_rng(seed)

    def propose(self, contexts: list[list[int]], budgets: list[int]) -> list[Draft]:
        drafts = []
        for b, (context, k) in enumerate(zip(contexts, budgets)):
            done = len(context) - len(self.prompts[b])
            drafts.append(Draft([int(self.rng.integers(self.vocab)) if self.rng.random() < self.err else t
                                 for t in self.continuations[b][done:done + k]]))
        return drafts


class MtpDrafter:
    """Drafts with the model's MTP head (Qwen3.5's multi-token prediction layer, as vLLM runs it),
    joined with the model in one graph (`session.drafting()`; backends/onnx/fuse.py).

    The head predicts token i + 2 from the main model's hidden state at position i and token i + 1.
    Every step of the joined graph feeds it the step's positions, so its KV cache over these pairs
    keeps up with the model's, and returns its argmax at each position the model judges: the one
    at the row's last accepted position is the next step's first draft. The head reads the model's
    argmax as the token after a judged position, which is the token greedy decoding accepts there;
    under sampling the drafts still follow the argmax (point masses that the acceptance rule
    judges, so the output distribution is unchanged; only fewer are accepted). Draft j + 1 chains
    on draft j: the pair (the head's own hidden state, draft j) one position on, as the head was
    trained (tools/train_tiny.py), run by the head alone (`draft_head`) on the joined state's MTP
    cache. The next step feeds the head from its first pending position on, over the chained
    pairs, so they need no rollback."""

    joined = True

    def __init__(self, session):
        self.session, self.head = session, None

    def start(self, state, extras: dict, lengths: list[int]) -> None:
        """A new generation, after the prefill: its state and outputs."""
        self.state = state
        self.next = extras["draft"][:, 0].tolist()
        self.carry = [extras["mtp_hidden"][b, n - 1] for b, n in enumerate(lengths)]
        self.at = [n - 1 for n in lengths]   # each row's position of the pair that drafted `next`

    def observe(self, b: int, extras: dict, i: int, position: int) -> None:
        """Row b's last accepted pair is the step's position i (`position` in the sequence)."""
        self.next[b], self.carry[b], self.at[b] = int(extras["draft"][b, i]), extras["mtp_hidden"][b, i], position

    def propose(self, contexts: list[list[int]], budgets: list[int]) -> list[Draft]:
        drafts = [[self.next[b]] if k > 0 else [] for b, k in enumerate(budgets)]
        chain = [b for b, k in enumerate(budgets) if k > 1]
        if chain and self.head is None:
            self.head = self.session.draft_head()
            self.cache = self.state.part([spec["name"] for spec in self.head.specs])
        batch, H = len(budgets), self.session.config.hidden_size
        for j in range(1, max(budgets, default=0)):
            chain = [b for b in chain if j < budgets[b]]
            if not chain:
                break
            ids, hidden = np.zeros((batch, 1), np.int64), np.zeros((batch, 1, H), np.float32)
            lengths, q_start = np.zeros(batch, np.int64), np.asarray(self.at, np.int64) + j
            for b in chain:
                ids[b, 0], hidden[b, 0], lengths[b] = drafts[b][-1], self.carry[b], 1
            logits, states = self.head.draft_step(ids, hidden, self.cache, q_start, lengths)
            for b in chain:
                drafts[b].append(int(logits[b].argmax()))
                self.carry[b] = states[b, 0]
        return [Draft(d) for d in drafts]


def generate_speculative(session, prompts: list[list[int]], max_new_tokens: int, k: int, drafter,
                         temperature: float, top_p: float, seed: int, stop_ids, on_token):
    """`Session.generate(..., speculative=k)`; see the module docstring."""
    if k < 1:
        raise QwenError(f"speculative needs at least 1 draft token a step, got {k}")
    if not session.extends:
        raise QwenError(f"{getattr(session, 'directory', None) or type(session).__name__}: no commit step, so no "
                        f"speculative decoding (onnx artifacts have one since the graph took a `commit` input)")
    if drafter in (None, "lookup"):
        drafter = PromptLookup()
    elif drafter == "mtp":
        if not hasattr(session, "drafting"):
            raise QwenError(f"{type(session).__name__} has no MTP head to draft with (onnx artifacts compile one)")
        session = session.drafting()       # refuses an artifact without a head
        drafter = MtpDrafter(session)
    elif isinstance(drafter, str):
        raise QwenError(f"unknown drafter '{drafter}' (lookup, mtp)")
    joined = getattr(drafter, "joined", False)
    if joined and not getattr(session, "joined", False):
        raise QwenError("an MTP drafter runs on its joined session: generate on drafter.session")
    batch, lengths = len(prompts), [len(p) for p in prompts]
    width = max(lengths)
    ids = np.zeros((batch, width), np.int64)
    for b, prompt in enumerate(prompts):
        ids[b, :len(prompt)] = prompt
    # a step reaches q_start + |pending| + |drafts| <= prompt + produced + K, and rows padded to the
    # longest row (at most 2K + 1 tokens) write their padding that far too
    capacity = width + max_new_tokens + 2 * k + 2
    state = session.new_state(batch, capacity)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    last = session.prefill_array(ids, state, np.asarray(lengths, np.int64), last_only=True,
                                 **({"extras": True} if joined else {}))
    if joined:
        last, extras = last
        drafter.start(state, extras, lengths)
    last = last[:, 0]
    prefill_seconds = time.perf_counter() - start
    position = list(lengths)           # tokens each row's state holds
    tokens: list[list[int]] = [[] for _ in range(batch)]
    contexts = [list(p) for p in prompts]     # prompt + tokens, what a drafter reads
    done = [max_new_tokens <= 0] * batch

    def emit(b: int, new: list[int]) -> None:
        for token in new:
            tokens[b].append(token)
            contexts[b].append(token)
            if on_token:
                on_token(b, token)
            if token in stop_ids or len(tokens[b]) >= max_new_tokens:
                done[b] = True
                return

    first = choose(last, temperature, top_p, rng)
    pending = [[int(t)] for t in first]
    for b in range(batch):
        if not done[b]:
            emit(b, pending[b])
    steps = drafted = accepted = 0
    decode_seconds = 0.0
    while not all(done):   # a step's time includes drafting and judging
        start = time.perf_counter()
        budgets = [0 if done[b] else min(k, max_new_tokens - len(tokens[b]) - 1) for b in range(batch)]
        drafts = drafter.propose(contexts, budgets)
        drafts = [Draft(d.tokens[:budgets[b]], None if d.probs is None else d.probs[:budgets[b]])
                  for b, d in enumerate(drafts)]
        rows = [[] if done[b] else pending[b] + drafts[b].tokens for b in range(batch)]
        step = np.zeros((batch, max(len(r) for r in rows)), np.int64)
        for b, row in enumerate(rows):
            step[b, :len(row)] = row
        commit = [0 if done[b] else len(pending[b]) for b in range(batch)]
        logits = session.extend_array(step, state, [len(r) for r in rows], commit, **({"extras": True} if joined else {}))
        if joined:
            logits, extras = logits
        steps += 1
        for b in range(batch):
            if done[b]:
                continue
            base, draft = len(pending[b]) - 1, drafts[b]
            new = _judge(logits[b, base:base + len(draft.tokens) + 1], draft, temperature, top_p, rng)
            drafted += len(draft.tokens)
            accepted += len(new) - 1
            if joined:
                drafter.observe(b, extras, base + len(new) - 1, position[b] + base + len(new) - 1)
            position[b] += commit[b]
            pending[b] = new
            emit(b, new)
        decode_seconds += time.perf_counter() - start
    produced = sum(max(len(t) - 1, 0) for t in tokens)   # the first token of each row is the prefill's
    return GenerationResult(tokens, lengths, prefill_seconds, decode_seconds, steps, [], produced,
                            drafted, accepted)


def _judge(logits: np.ndarray, draft: Draft, temperature: float, top_p: float, rng: np.random.Generator) -> list[int]:
    """The accepted drafts and the model's own next token, from the logits after the last pending
    token and after each draft ([len(draft) + 1, V])."""
    if temperature <= 0:
        best = greedy(logits).tolist()
        new = []
        for i, d in enumerate(draft.tokens):
            if best[i] != d:
                return new + [best[i]]
            new.append(d)
        return new + [best[len(draft.tokens)]]
    new = []
    for i, d in enumerate(draft.tokens):
        p = sampling_probs(logits[i], temperature, top_p)
        p = p / p.sum()
        q = None if draft.probs is None else np.asarray(draft.probs[i], dtype=np.float64)
        ratio = p[d] if q is None else p[d] / q[d]
        if rng.random() < ratio:
            new.append(d)
            continue
        residual = p.copy()
        if q is None:
            residual[d] = 0
        else:
            residual = np.clip(p - q, 0, None)
        if residual.sum() <= 0:     # only when p == q, where every draft is accepted anyway
            residual = p
        return new + [int(sample(residual, rng))]
    return new + [int(choose(logits[len(draft.tokens)][None], temperature, top_p, rng)[0])]


__all__ = ["Draft", "MtpDrafter", "PromptLookup", "Replay", "generate_speculative"]
