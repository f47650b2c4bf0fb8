"""`qwen35c perplexity [MODEL] --text FILE`: teacher-forced perplexity, bits per byte and KL."""

from __future__ import annotations

import json

import click

from qwen35c.errors import QwenError


@click.command("perplexity")
@click.argument("model", required=False)
@click.option("--text", "text_path", required=True, metavar="FILE", help="UTF-8 text file to score.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--context", type=int, default=None, show_default="256",
              help="Tokens per window (the most context any prediction sees).")
@click.option("--stride", type=int, default=None, show_default="context",
              help="New tokens scored per window; < context gives every target more context.")
@click.option("--save-logits", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Store this run's distributions (safetensors) to compare later with --kl-base.")
@click.option("--logits-top-k", type=int, default=64, show_default=True,
              help="With --save-logits: keep the top-k log-probs per token (0 = full vocabulary).")
@click.option("--kl-base", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="A --save-logits file to report KL divergence and top-1 agreement against.")
def command(model, text_path, as_json, context, stride, save_logits, logits_top_k, kl_base):
    """Perplexity of MODEL (default: the bundled qwen35-tiny) over a text file.

    Reports tokens, mean NLL (nats), perplexity and bits per byte; with --kl-base also kl_mean,
    kl_p99, kl_max and top1_agreement against a saved base run.
    """
    from qwen35c.eval import perplexity as ppl
    from qwen35c.models import resolve_model

    text = ppl.read_text(text_path)
    if context is not None and context < 1:
        raise QwenError(f"--context must be at least 1, got {context}")
    path = resolve_model(model)
    logits_fn, tokenizer = ppl.load_checkpoint(path)
    ids = ppl.encode_text(tokenizer, text)
    if len(ids) < 2:
        raise QwenError(f"{text_path}: no text to score (empty file)")
    result = ppl.evaluate(logits_fn, ids, n_bytes=len(text.encode("utf-8")), context=context,
                          stride=stride, save_logits=save_logits, top_k=logits_top_k,
                          kl_base=kl_base)
    result = {"model": str(path), "text": str(text_path), **result}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"model          {path}")
    click.echo(f"text           {text_path} ({result['bytes']} bytes, {result['tokens']} tokens)")
    click.echo(f"windows        context {result['context']}, stride {result['stride']}")
    click.echo(f"nll_mean       {result['nll_mean']:.4f} nats/token")
    click.echo(f"perplexity     {result['perplexity']:.3f}")
    click.echo(f"bits_per_byte  {result['bits_per_byte']:.4f}")
    if kl_base is not None:
        click.echo(f"kl_mean        {result['kl_mean']:.6f}")
        click.echo(f"kl_p99         {result['kl_p99']:.6f}")
        click.echo(f"kl_max         {result['kl_max']:.6f}")
        click.echo(f"top1_agreement {result['top1_agreement']:.4f}")
    if save_logits is not None:
        click.echo(f"saved          {save_logits}")
