"""Quantization quality side by side with llama.cpp, in llama.cpp's own protocol (not a test).

    python bench/bench_kld.py --model qwen35c/models/qwen35-tiny --artifact ART [--artifact ART2 ...]
        [--text FILE] [--ctx 256] [--chunks 64]
        [--llama-perplexity BUILD/bin/llama-perplexity --gguf-base F32.gguf --gguf Q4_0.gguf[,Q4_K_M.gguf]]

`llama-perplexity --kl-divergence` splits the text into CHUNKS chunks of CTX tokens, runs each from an
empty state and scores positions CTX/2 .. CTX-2 of each (their logits predict the second half of the
chunk): mean full-vocabulary KL(base || quantized), the share of positions whose top-1 token agrees,
and PPL(quantized) / PPL(base). This script does exactly that for qwen35c artifacts against the fp32
reference of MODEL (the same tokens: the reference's PPL equals llama.cpp's F32 base PPL when the
tokenizers agree, and the report shows both), and, given llama.cpp's binary and GGUFs of MODEL
(convert_hf_to_gguf.py --outtype f32 --no-mtp, then llama-quantize), runs llama-perplexity on them.
The text defaults to the held-out stdlib files (`reference.corpus.HELD_OUT`), as `qwen35c verify`'s
quantization check uses. llama.cpp's Q4_0 / Q4_K_M GEMMs round activations to 8 bits (q8 blocks) as
cpu-int4's MatMulNBits do; both sides are measured as they run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from qwen35c.runtime import load


def heldout_text() -> str:
    from reference.corpus import HELD_OUT

    root = Path(sysconfig.get_paths()["stdlib"])
    return "".join((root / n).read_bytes().decode("utf-8", errors="replace") for n in HELD_OUT if (root / n).is_file())


def ours(reference, artifact: str, text: str, ctx: int, chunks: int) -> dict:
    session = load(artifact)
    ids = session.tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < ctx * chunks:
        sys.exit(f"the text has {len(ids)} tokens, fewer than {chunks} chunks of {ctx}")
    kl = nll_base = nll_q = 0.0
    same = positions = 0
    for c in range(chunks):
        chunk = torch.tensor(ids[c * ctx:(c + 1) * ctx]).view(1, ctx)
        base = torch.log_softmax(reference.logits(chunk)[0].double(), -1)[ctx // 2:ctx - 1]
        quant = torch.log_softmax(session.logits(chunk)[0].double(), -1)[ctx // 2:ctx - 1]
        target = chunk[0, ctx // 2 + 1:].view(-1, 1)
        kl += float((base.exp() * (base - quant)).sum())
        same += int((base.argmax(-1) == quant.argmax(-1)).sum())
        nll_base -= float(base.gather(1, target).sum())
        nll_q -= float(quant.gather(1, target).sum())
        positions += target.numel()
    return {"engine": f"qwen35c {artifact}", "positions": positions, "ppl_base": round(math.exp(nll_base / positions), 4),
            "ppl_ratio": round(math.exp((nll_q - nll_base) / positions), 6), "kl_mean": round(kl / positions, 6),
            "same_top1": round(same / positions, 5)}


def _number(pattern: str, log: str) -> float:
    match = re.search(pattern, log)
    if match is None:
        raise RuntimeError(f"llama-perplexity output has no '{pattern}':\n{log[-2000:]}")
    return float(match.group(1))


def _run(cmd: list[str]) -> str:
    """llama-perplexity's log (it prints to both streams)."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}")
    return proc.stdout


def llama(binary: str, base: str, ggufs: list[str], text_file: str, ctx: int, chunks: int) -> list[dict]:
    common = ["-f", text_file, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        logits = str(Path(tmp) / "base.kld")
        log = _run([binary, "-m", base, *common, "--kl-divergence-base", logits])
        ppl_base = _number(r"Final estimate: PPL = ([\d.]+)", log)
        rows = []
        for gguf in ggufs:
            log = _run([binary, "-m", gguf, *common, "--kl-divergence-base", logits, "--kl-divergence"])
            rows.append({"engine": f"llama.cpp {Path(gguf).name}", "positions": chunks * (ctx - 1 - ctx // 2),
                         "ppl_base": ppl_base, "ppl_ratio": _number(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)", log),
                         "kl_mean": _number(r"Mean\s+KLD:\s*([\d.]+)", log),
                         "same_top1": round(_number(r"Same top p:\s*([\d.]+)", log) / 100, 5)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the checkpoint the artifacts and GGUFs were made from")
    ap.add_argument("--artifact", action="append", default=[])
    ap.add_argument("--text", default=None, help="a UTF-8 text file (default: the held-out stdlib files)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--llama-perplexity", default=None)
    ap.add_argument("--gguf-base", default=None, help="the F32 GGUF (llama.cpp's base logits)")
    ap.add_argument("--gguf", default="", help="quantized GGUFs, comma list")
    args = ap.parse_args()
    text = Path(args.text).read_text() if args.text else heldout_text()
    rows = []
    reference = load(args.model, "float32")
    for artifact in args.artifact:
        rows.append(ours(reference, artifact, text, args.ctx, args.chunks))
    if args.llama_perplexity and args.gguf_base and args.gguf:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write(text)
            f.flush()
            rows += llama(args.llama_perplexity, args.gguf_base, args.gguf.split(","), f.name, args.ctx, args.chunks)
    print(json.dumps({"model": args.model, "ctx": args.ctx, "chunks": args.chunks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
