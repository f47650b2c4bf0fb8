"""`qwen35c run [MODEL]`: generate with a checkpoint (and, later, a compiled artifact)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from qwen35c.commands._common import SEED, FiniteFloat, emit_json, info, parse_ids
from qwen35c.errors import QwenError


@click.command("run")
@click.argument("model", required=False)
@click.option("--prompt", help="Text prompt (tokenized with the model's tokenizer.json).")
@click.option("--prompt-ids", help="Comma-separated token ids instead of --prompt.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=0),
              help="Tokens to generate (0 = prefill only).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(0, 100), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0, 1, lo_open=True))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--ignore-eos", is_flag=True, help="Keep generating after an end-of-sequence token.")
@click.option("--save-logits", type=click.Path(dir_okay=False, path_type=Path),
              help="Write float32 logits [prompt + generated, vocab] as .npy (atomically; the directory must exist).")
@click.option("--speculative", default=0, show_default=True, type=click.IntRange(0, 16), metavar="K",
              help="Draft up to K tokens a step (see --drafter) and verify them in one pass (0 = off). "
                   "Greedy output is unchanged; sampling keeps its distribution. Needs an onnx artifact.")
@click.option("--drafter", type=click.Choice(["lookup", "mtp"]), default="lookup", show_default=True,
              help="What drafts for --speculative: prompt lookup, or the artifact's compiled MTP head.")
@click.option("--json", "as_json", is_flag=True, help="Print ids, text and timings as JSON.")
def command(model, prompt, prompt_ids, max_new_tokens, dtype, temperature, top_p, seed, ignore_eos,
            save_logits, speculative, drafter, as_json):
    """Generate from MODEL (a checkpoint directory; default: the bundled dense model)."""
    from qwen35c.models import resolve_model
    from qwen35c.runtime import load

    if (prompt is None) == (prompt_ids is None):
        raise QwenError("give exactly one of --prompt or --prompt-ids")
    path = resolve_model(model)
    session = load(path, dtype, drafting=bool(speculative) and drafter == "mtp")
    for note in getattr(getattr(session, "model", None), "load_notes", []):
        info(f"note: {note}")
    tokenizer = session.tokenizer
    if prompt is not None:
        if tokenizer is None:
            raise QwenError(f"{path}: no tokenizer.json; use --prompt-ids")
        ids = tokenizer.encode(prompt).ids
        if not ids:
            raise QwenError("--prompt: the prompt encodes to no tokens")
    else:
        ids = parse_ids(prompt_ids)
    vocab = session.config.vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        if prompt is not None:
            raise QwenError(f"{path}: tokenizer.json gives token id {max(ids)} for --prompt, but the model's "
                            f"vocab_size is {vocab} (tokenizer and model do not match)")
        raise QwenError(f"--prompt-ids: token ids must lie in [0, {vocab})")
    context = session.config.max_position_embeddings
    if len(ids) > context:
        raise QwenError(f"the prompt has {len(ids)} tokens; the model's context (max_position_embeddings) is {context}")
    if speculative and save_logits is not None:
        raise QwenError("--save-logits is not offered with --speculative")
    if speculative and drafter == "mtp" and not getattr(session, "drafts", False):
        raise QwenError(f"{path}: --drafter mtp needs an artifact with a compiled MTP head (its checkpoint had none, "
                        f"or it was built with --no-mtp)")
    if len(ids) + max_new_tokens > context:
        raise QwenError(f"--max-new-tokens {max_new_tokens}: the prompt ({len(ids)} tokens) leaves room for at most "
                        f"{context - len(ids)} new tokens (max_position_embeddings {context})")
    stop = () if ignore_eos else tuple(session.config.eos_token_ids)

    streamed: list[int] = []
    printed = [""]

    def stream(_row: int, token: int) -> None:
        if as_json or tokenizer is None:
            return
        streamed.append(token)
        text = tokenizer.decode(streamed)
        if not text.endswith("\ufffd"):  # wait for complete UTF-8 sequences
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    if not as_json and tokenizer is not None and prompt is not None:
        sys.stdout.write(prompt)
    result = session.generate([ids], max_new_tokens, temperature, top_p, seed, stop,
                              keep_logits=save_logits is not None, on_token=stream, speculative=speculative,
                              drafter=drafter)
    generated = result.tokens[0]
    if save_logits is not None:
        from qwen35c.artifact import atomic_file

        with atomic_file(save_logits, "--save-logits") as f:
            np.save(f, result.logits[0].astype(np.float32))
    text = tokenizer.decode(generated) if tokenizer is not None else None
    timings = {"prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
               "prefill_tokens_per_second": result.prefill_tokens_per_second,
               "decode_tokens_per_second": result.decode_tokens_per_second}
    if speculative:
        timings.update(speculative=speculative, drafter=drafter, decode_steps=result.decode_steps, drafted=result.drafted,
                       accepted=result.accepted)
    if as_json:
        emit_json({"model": str(path), "prompt_ids": ids, "generated_ids": generated, "text": text, **timings})
        return
    if tokenizer is None:
        click.echo(",".join(map(str, generated)))
    else:
        click.echo()
    drafts = (f"; {result.accepted}/{result.drafted} drafts accepted, {result.decode_steps} steps"
              if speculative else "")
    info(f"[{len(ids)} prompt tokens: {result.prefill_tokens_per_second:.1f} tok/s prefill; "
         f"{len(generated)} generated: {result.decode_tokens_per_second:.1f} tok/s decode{drafts}]")
