"""Reference model vs HF transformers eager: prefill and decode tokens/s on the same checkpoint.

    python bench/bench_reference.py --model /work/ckpt/0.8b --dtype bfloat16 --prompt 128 --decode 16

Both run greedy generation with a KV/state cache on the same prompt, interleaved (ours, HF, ours,
HF, ...) so machine noise hits both alike; the median of the repeats is reported. Prefill computes
the head at the last position only in both (HF generate does the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.modules.setdefault("fla", None)  # keep HF on its torch path on CPU (notes §10)


def bench_ours(path, dtype, prompt, decode):
    from qwen35c.runtime import load

    session = load(path, dtype)

    def run():
        result = session.generate([prompt], decode, stop_ids=())
        return result.prefill_tokens_per_second, result.decode_tokens_per_second
    return run


def bench_hf(path, dtype, prompt, decode):
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])

    @torch.no_grad()
    def run():
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode - 1):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        return len(prompt) / prefill, (decode - 1) / elapsed
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 1000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    runners = {"qwen35c-reference": bench_ours(args.model, args.dtype, prompt, args.decode),
               "hf-transformers": bench_hf(args.model, args.dtype, prompt, args.decode)}
    for run in runners.values():  # warm-up
        run()
    results = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            results[name].append(run())
    report = {"model": args.model, "dtype": args.dtype, "prompt": args.prompt, "decode": args.decode,
              "threads": args.threads}
    for name, samples in results.items():
        report[name] = {"prefill_tok_s": statistics.median(s[0] for s in samples),
                        "decode_tok_s": statistics.median(s[1] for s in samples)}
    ours, theirs = report["qwen35c-reference"], report["hf-transformers"]
    report["ratio_vs_hf"] = {k: ours[k] / theirs[k] for k in ours}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
