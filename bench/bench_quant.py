"""Quantization quality table: per-scheme weight error, mean / p99 KL, top-1 agreement and perplexity
ratio against the full-precision reference, teacher-forced on held-out text.

    python bench/bench_quant.py                       # the bundled qwen35-tiny and qwen35-tiny-moe
    python bench/bench_quant.py MODEL_DIR ... --max-tokens 8192 --json out.json
    python bench/bench_quant.py --random tiny-moe     # a random checkpoint (random token ids)
    python bench/bench_quant.py --schemes 'int4-gptq,int4-gptq:activations=int8'   # recipe options after ':'


KL and top-1 come from `qwen35c.eval.perplexity.evaluate` — the same code as
`qwen35c perplexity MODEL --kl-base` — with the base distribution saved from the fp32 reference
(`--save-logits`, full vocabulary) and each scheme's quantization-emulating reference scored against it.
Held-out text: the stdlib files the bundled models never trained on (`reference.corpus.HELD_OUT`);
calibration: the same built-in calibration set a build uses (`qwen35c.quant.calibrate.builtin_calibration`:
bundled training-split text, 8192 tokens in 32 sequences of 256), so the AWQ / GPTQ rows are what
`qwen35c build --target cpu-int4` ships. `--include GLOB` (repeatable) quantizes more than the INT4
default policy (e.g. '*.self_attn.*' '*.linear_attn.in_proj_qkv.*' ...) for a harder comparison.
Gates (issue 6): FP8 block mean KL <= 5e-3 and top-1 >= 96%; INT4 AWQ/GPTQ mean KL <= 0.05,
top-1 >= 90%, and both below RTN's KL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

SCHEMES = ["fp8-block128", "fp8-channel", "fp8-tensor", "int4-rtn", "int4-awq", "int4-gptq"]


def _texts(max_tokens: int, tokenizer, calib_tokens: int):
    from reference.corpus import corpus_files, read_text

    held = "".join(read_text(p) for p in corpus_files("heldout"))
    train_files = corpus_files("train")
    calib_ids: list[int] = []
    for path in train_files[:: max(1, len(train_files) // 64)]:
        calib_ids += tokenizer.encode(read_text(path), add_special_tokens=False).ids
        if len(calib_ids) >= calib_tokens:
            break
    return held, calib_ids[:calib_tokens]


def gates(scheme: str, row: dict, rtn_kl: float | None) -> str:
    if scheme == "fp8-block128":
        ok = row["kl_mean"] <= 5e-3 and row["top1_agreement"] >= 0.96
    elif scheme in ("int4-awq", "int4-gptq"):
        ok = row["kl_mean"] <= 0.05 and row["top1_agreement"] >= 0.90 and (rtn_kl is None or row["kl_mean"] < rtn_kl)
    else:
        return "-"
    return "pass" if ok else "FAIL"


def _quantize(model, path, recipe, calib, batches, order: str):
    """One-shot (every layer calibrated on the full-precision model) or sequential (layer by layer on
    the quantized model's activations: what `qwen35c build` does, `qwen35c.quant.sequential`)."""
    from qwen35c.quant import plan_model, quantize_model
    from qwen35c.quant.sequential import quantize_sequential
    from reference.stream import StreamedModel

    if order == "one-shot" or not recipe.needs_calibration:
        return quantize_model(model, recipe, calib if recipe.needs_calibration else None)
    return quantize_sequential(StreamedModel(path), recipe, plan_model(model, recipe), batches,
                               mode=recipe.moe_calibration)


def bench_model(name: str, model, ids: list[int], calib_ids, schemes, context: int, seq_len: int,
                n_bytes: int | None, include: tuple[str, ...] = (), path=None, order: str = "sequential") -> list[dict]:
    from qwen35c.eval.perplexity import checkpoint_logits_fn, evaluate
    from qwen35c.quant import calibrate, emulate, parse_scheme, weight_errors

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / "base.safetensors"
        t0 = time.time()
        base = evaluate(checkpoint_logits_fn(model), ids, n_bytes=n_bytes, context=context,
                        save_logits=base_path, top_k=0)
        print(f"[{name}] base ppl {base['perplexity']:.4f} over {base['tokens']} tokens "
              f"({time.time() - t0:.0f}s)", file=sys.stderr)
        batches = calib_ids if isinstance(calib_ids[0], torch.Tensor) else \
            calibrate.calibration_batches(calib_ids, seq_len, max_batches=len(calib_ids) // seq_len)
        calib = calibrate.collect(model, batches)
        rtn_kl = None
        for scheme in schemes:
            t0 = time.time()
            base_scheme, *opts = scheme.split(":")      # e.g. int4-gptq:activations=int8:fp32_activations=lm_head.weight
            options = {}
            for opt in opts:
                key, value = opt.split("=", 1)
                options[key] = tuple(value.split(";")) if key in ("include", "exclude", "fp32_activations") else \
                    (int(value) if value.isdigit() else value)
            if include and base_scheme.startswith("int4"):
                options["include"] = tuple(include) + tuple(options.get("include", ()))
            recipe = parse_scheme(base_scheme, **options)
            quantized = _quantize(model, path, recipe, calib, batches, order)
            t_quant = time.time() - t0
            errors = weight_errors(model, quantized, calib)["summary"]
            emulated = emulate(model, quantized)
            result = evaluate(checkpoint_logits_fn(emulated), ids, n_bytes=n_bytes, context=context,
                              kl_base=base_path)
            row = {"model": name, "order": order if recipe.needs_calibration else "-", "scheme": recipe.label + (" +" + "+".join(include) if recipe.include else ""), "units": len(quantized.weights),
                   "weight_rel": errors["weight_rel_mean"], "output_rel": errors.get("output_rel_mean"),
                   "kl_mean": result["kl_mean"], "kl_p99": result["kl_p99"],
                   "top1_agreement": result["top1_agreement"],
                   "ppl_ratio": result["perplexity"] / base["perplexity"], "tokens": result["tokens"],
                   "quantize_s": t_quant, "eval_s": time.time() - t0 - t_quant}
            if base_scheme == "int4-rtn" and not opts:
                rtn_kl = row["kl_mean"]
            row["gate"] = gates(base_scheme, row, rtn_kl)
            rows.append(row)
            print(f"[{name}] {row['scheme']:<18} {row['order']:<10} KL {row['kl_mean']:.5f} p99 {row['kl_p99']:.4f} "
                  f"top1 {row['top1_agreement']:.4f} ppl x{row['ppl_ratio']:.4f} {row['gate']} "
                  f"(quantize {t_quant:.0f}s)", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | scheme | order | quantized units | weight rel err | output rel err | mean KL | p99 KL | top-1 | PPL ratio | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out_rel = f"{r['output_rel']:.4f}" if r["output_rel"] is not None else "-"
        lines.append(f"| {r['model']} | {r['scheme']} | {r.get('order', '-')} | {r['units']} | {r['weight_rel']:.4f} | {out_rel} | "
                     f"{r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {100 * r['top1_agreement']:.2f}% | "
                     f"{r['ppl_ratio']:.4f} | {r['gate']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model directories or bundled names (default: both bundled)")
    parser.add_argument("--random", action="append", default=[], metavar="PRESET",
                        help="also bench a random checkpoint of PRESET (hidden 256) on random tokens")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored per model")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--order", choices=["sequential", "one-shot"], default="sequential",
                        help="calibrate layer by layer on the quantized model (what builds do) or all layers "
                             "on the full-precision model (before issue 19)")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="INT4: also quantize tensors matching GLOB (default policy: MLPs and experts only)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)

    from qwen35c.eval.perplexity import encode_text, load_tokenizer
    from qwen35c.models import BUNDLED, resolve_model
    from reference.checkpoint import load_model, make_random_checkpoint

    schemes = args.schemes.split(",")
    rows: list[dict] = []
    models = args.models or ([] if args.random else list(BUNDLED))
    for spec in models:
        path = resolve_model(spec)
        model = load_model(path)
        tokenizer = load_tokenizer(path)
        from qwen35c.quant.calibrate import builtin_calibration

        held, _ = _texts(args.max_tokens, tokenizer, 0)
        calib = builtin_calibration(path, model.config.vocab_size, max_tokens=args.calib_tokens).batches
        ids = encode_text(tokenizer, held)[: args.max_tokens + 1]
        n_bytes = len(tokenizer.decode(ids[1:]).encode()) if len(ids) else None
        rows += bench_model(Path(path).name, model, ids, calib, schemes, args.context, 256, n_bytes,
                            tuple(args.include), path=path, order=args.order)
    for preset in args.random:
        with tempfile.TemporaryDirectory() as tmp:
            extra = {"moe_intermediate_size": 128} if "moe" in preset else {"intermediate_size": 512}
            path = make_random_checkpoint(preset, 0, Path(tmp) / preset, hidden_size=256, **extra)
            model = load_model(path)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, model.config.vocab_size, (args.max_tokens + 1,), generator=g).tolist()
            calib_ids = torch.randint(0, model.config.vocab_size, (args.calib_tokens,), generator=g).tolist()
            rows += bench_model(f"random-{preset}", model, ids, calib_ids, schemes, args.context, 256, None,
                                tuple(args.include), path=path, order=args.order)
    print(table(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
