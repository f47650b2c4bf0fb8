"""Train the two bundled tiny Qwen3.5-architecture checkpoints on the Python standard library.

The checkpoints that ship in `qwen35c/models/` (`qwen35-tiny`, dense; `qwen35-tiny-moe`, 8 experts
top-2 plus the gated shared expert) are produced by this script, on CPU, from data that exists
offline on every machine: the `.py` files of the running interpreter's standard library.

    python tools/train_tiny.py tokenizer --out build/tiny/tokenizer.json
    python tools/train_tiny.py train --variant dense --tokenizer build/tiny/tokenizer.json \
        --out qwen35c/models/qwen35-tiny
    python tools/train_tiny.py train --variant moe --tokenizer build/tiny/tokenizer.json \
        --out qwen35c/models/qwen35-tiny-moe
    python tools/train_tiny.py card --variant dense --out qwen35c/models/qwen35-tiny

Everything that decides the result is recorded: the seed, the Python version and the sha256 of the
corpus file list and contents, the tokenizer settings and every hyper-parameter (written to
`training.json` in the build dir and summarised in the model card README.md).

Data: every `*.py` under `sysconfig.get_paths()['stdlib']`, sorted by relative path, minus
test suites, `site-packages`, generated tables (`encodings/`, `pydoc_data/`) and the held-out
files in `HELD_OUT`, which are used only for evaluation. Training runs single-threaded
(`torch.set_num_threads(1)`) so it is deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

# Runnable as `python tools/train_tiny.py` from the repo root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from reference.corpus import (EXCLUDED_DIRS, HELD_OUT, corpus_digest, corpus_facts,  # noqa: E402
                              corpus_files, read_text, stdlib_dir)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 4096  # BPE merges + 256 byte symbols + the 3 special tokens (appended last, as in Qwen)
# Qwen2 pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newline
# runs, whitespace runs (so Python indentation becomes its own tokens); no normalizer, so
# decode(encode(text)) == text for every text. (transformers' Qwen3_5Tokenizer rebuilds the
# pipeline with NFC and a \p{M}-aware variant of this regex: identical on ASCII / NFC text.)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SEED = 1234

# ---- tokenizer ----------------------------------------------------------------------------------
def train_tokenizer(out: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Byte-level BPE (GPT-2 byte alphabet, Qwen2 split regex), special tokens appended last."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    files = corpus_files("train")
    tok.train_from_iterator((read_text(f) for f in files), trainer=trainer, length=len(files))
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))


def write_tokenizer_files(tokenizer_json: Path, out_dir: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json so HF AutoTokenizer can read the directory too."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": True}
             for t in SPECIAL_TOKENS}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
           "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "unk_token": None, "add_bos_token": False, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": added}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def tokenize_corpus(tok, files: list[Path]):
    """One stream: file, <|endoftext|>, file, <|endoftext|>, ... (uint16 numpy array)."""
    import numpy as np

    eos = tok.token_to_id("<|endoftext|>")
    texts = [read_text(f) for f in files]
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(parts)


# ---- models -------------------------------------------------------------------------------------
def model_config(variant: str, vocab_size: int, eos_id: int):
    """The architecture of the two bundled models (see the module docstring)."""
    from reference.config import Qwen35Config

    common = dict(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-6, rope_theta=10_000_000.0, partial_rotary_factor=0.25,
        mrope_section=[3, 3, 2],  # rotary dim 16 = 8 frequency pairs (text-only: all sections equal)
        max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=eos_id, bos_token_id=None, pad_token_id=eos_id,
    )
    if variant == "dense":
        return Qwen35Config(model_type="qwen3_5", intermediate_size=512, **common)
    if variant == "moe":
        return Qwen35Config(model_type="qwen3_5_moe", num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=64, shared_expert_intermediate_size=128, **common)
    raise SystemExit(f"unknown variant {variant!r} (dense or moe)")


# Training runs in phases; each phase is a warm restart (fresh AdamW, its own warmup and cosine,
# data windows seeded with seed + phase index) from the previous phase's weights. `train --resume`
# runs the phases that build/tiny/VARIANT/training.json does not list yet, from
# build/tiny/VARIANT/state.pt. Phase 1 was a short first run; phase 2 trains ~6x longer (the
# dense and MoE runs side by side, one thread each, about an hour on the 2-core build machine) and
# balances the MoE per layer: the auxiliary loss is the mean of each layer's own Switch loss
# rather than HF's loss pooled over all layers, which let single layers collapse onto one expert.
_COMMON = dict(seq_len=256, min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
_PHASE1 = dict(_COMMON, batch_size=6, steps=200, lr=3e-3, warmup=20)
_PHASE2 = dict(_COMMON, batch_size=8, lr=2e-3, warmup=30)
PHASES = {
    "dense": [dict(_PHASE1, router_aux_loss_coef=0.0),
              dict(_PHASE2, steps=1050, router_aux_loss_coef=0.0)],
    "moe": [dict(_PHASE1, router_aux_loss_coef=0.01,
                 router_aux_loss="pooled over layers (HF load_balancing_loss_func)"),
            dict(_PHASE2, steps=950, router_aux_loss_coef=0.05, router_aux_loss="mean of per-layer losses")],
}
HPARAMS = PHASES  # variant names


def moe_blocks(model) -> list:
    """The reference model's SparseMoeBlocks (each layer's `mlp` when the model is MoE)."""
    from reference.model import SparseMoeBlock

    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def router_logits(model) -> list:
    """Router logits [N, E] of every MoE block from the last training-mode forward."""
    return [block.router_logits for block in moe_blocks(model)]


def aux_loss(router_logits: list, num_experts: int, top_k: int, hp: dict):
    if hp["router_aux_loss"].startswith("mean"):
        return sum(load_balancing_loss([x], num_experts, top_k) for x in router_logits) / len(router_logits)
    return load_balancing_loss(router_logits, num_experts, top_k)


def load_balancing_loss(router_logits: list, num_experts: int, top_k: int):
    """Switch/Mixtral auxiliary loss, as HF's `load_balancing_loss_func` (all layers pooled):
    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e)."""
    import torch

    logits = torch.cat(router_logits, dim=0)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    _, selected = torch.topk(probs, top_k, dim=-1)
    mask = torch.nn.functional.one_hot(selected, num_experts).float()  # [N, k, E]
    tokens_per_expert = mask.mean(dim=0)  # [k, E]
    prob_per_expert = probs.mean(dim=0)  # [E]
    return num_experts * (tokens_per_expert * prob_per_expert[None]).sum()


def lr_at(step: int, hp: dict) -> float:
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    progress = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
    floor = hp["lr"] * hp["min_lr_ratio"]
    return floor + (hp["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(variant: str, tokenizer_json: Path, out_dir: Path, steps: int | None = None,
          log_every: int = 10, threads: int = 1, resume: bool = False) -> None:
    import numpy as np
    import torch

    from reference.model import Qwen35ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    tok = load_tokenizer(tokenizer_json)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = model_config(variant, tok.get_vocab_size(), eos)
    model = Qwen35ForCausalLM(cfg)
    model.init_weights(SEED)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{variant}] {n_params / 1e6:.2f} M parameters", flush=True)
    work = work_dir(variant)
    work.mkdir(parents=True, exist_ok=True)
    record = {
        "variant": variant, "seed": SEED, "parameters": n_params,
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size(),
                      "special_tokens": SPECIAL_TOKENS, "split_regex": QWEN_SPLIT, "min_frequency": 2,
                      "trained_on": "the training files"},
        "data": {**corpus_facts(),
                 "layout": "files in sorted order, each followed by <|endoftext|>; windows of "
                           "seq_len+1 tokens at uniformly random offsets (torch.Generator seeded "
                           "with seed + phase index)"},
        "optimizer": "AdamW (decay on >=2-D weights except norms), fresh at each phase; linear "
                     "warmup then cosine to min_lr_ratio * lr",
        "software": {"python": platform.python_version(), "torch": torch.__version__},
        "threads": threads, "dtype": "float32 training, bfloat16 checkpoint",
        "phases": [],
    }
    if resume:
        model.load_state_dict(torch.load(work / "state.pt", weights_only=True))
        record["phases"] = json.loads((work / "training.json").read_text())["phases"]
    t0 = time.time()
    stream = torch.from_numpy(tokenize_corpus(tok, corpus_files("train")).astype(np.int64))
    record["data"]["train_tokens"] = len(stream)
    print(f"[{variant}] corpus: {len(stream)} tokens ({time.time() - t0:.1f}s)", flush=True)

    for index in range(len(record["phases"]), len(PHASES[variant])):
        hp = dict(PHASES[variant][index])
        if steps is not None:
            hp["steps"] = steps
        record["phases"].append(train_phase(model, cfg, stream, hp, index, variant, log_every))
        torch.save(model.state_dict(), work / "state.pt")
        (work / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[{variant}] weights in {work}", flush=True)
    export(variant, tokenizer_json, out_dir)


def train_phase(model, cfg, stream, hp: dict, index: int, variant: str, log_every: int) -> dict:
    import torch

    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=1e-8)
    gen = torch.Generator().manual_seed(SEED + index)
    T, B = hp["seq_len"], hp["batch_size"]
    log = []
    t_start = time.time()
    ema = None
    for step in range(hp["steps"]):
        starts = torch.randint(0, len(stream) - T - 1, (B,), generator=gen)
        batch = torch.stack([stream[s:s + T + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp)
        logits = model(batch[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               batch[:, 1:].reshape(-1))
        loss = ce
        aux = None
        if cfg.is_moe:
            aux = aux_loss(router_logits(model), cfg.num_experts, cfg.num_experts_per_tok, hp)
            loss = ce + hp["router_aux_loss_coef"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        ce_val = float(ce.detach())
        ema = ce_val if ema is None else 0.95 * ema + 0.05 * ce_val
        if step % log_every == 0 or step == hp["steps"] - 1:
            el = time.time() - t_start
            rec = {"step": step, "ce": round(ce_val, 4), "ce_ema": round(ema, 4),
                   "lr": round(lr_at(step, hp), 6), "grad_norm": round(float(gnorm), 3),
                   "elapsed_s": round(el, 1)}
            if aux is not None:
                rec["aux"] = round(float(aux.detach()), 4)
            log.append(rec)
            eta = el / (step + 1) * (hp["steps"] - step - 1)
            print(f"[{variant}:{index + 1}] " + " ".join(f"{k}={v}" for k, v in rec.items())
                  + f" eta={eta:.0f}s", flush=True)
    model.eval()
    wall = time.time() - t_start
    print(f"[{variant}] phase {index + 1} trained in {wall:.0f}s", flush=True)
    return {"hyperparameters": hp, "wall_s": round(wall, 1), "tokens_seen": hp["steps"] * B * T,
            "final_train_ce_ema": round(ema, 4), "log": log}


def work_dir(variant: str) -> Path:
    return _ROOT / "build" / "tiny" / variant


def export(variant: str, tokenizer_json: Path, out_dir: Path) -> None:
    """Write the shipped checkpoint dir from the work dir: bf16 official-layout checkpoint,
    tokenizer files, training.json."""
    import torch

    from reference.checkpoint import save_checkpoint
    from reference.model import Qwen35ForCausalLM

    tok = load_tokenizer(tokenizer_json)
    cfg = model_config(variant, tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"))
    model = Qwen35ForCausalLM(cfg)
    model.load_state_dict(torch.load(work_dir(variant) / "state.pt", weights_only=True))
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out_dir, dtype=torch.bfloat16, layout="vlm", experts="fused")
    write_tokenizer_files(tokenizer_json, out_dir)
    (out_dir / "training.json").write_text((work_dir(variant) / "training.json").read_text())
    print(f"[{variant}] wrote {out_dir}", flush=True)


# ---- the MTP head --------------------------------------------------------------------------------
# The multi-token-prediction layer (issue 18) is trained after the base, with the base frozen: the
# MTP loss only (cross-entropy of token i+2 from the base's final hidden state at i and the
# embedding of token i+1, through the shared lm_head). The base tensors are written back unchanged
# (bf16 -> fp32 -> bf16 is exact), so every figure measured on the base stays valid; training.json
# records their digest and the test suite checks it.
MTP_PHASE = dict(_COMMON, batch_size=8, steps=600, lr=2e-3, warmup=20, router_aux_loss_coef=0.01,
                 router_aux_loss="the MTP layer's own Switch loss")
# Then the head is distilled from the base: the same windows, but the target of the draft of token
# i+2 is the base's own next-token distribution at i+1 (soft cross-entropy), not the data's token.
# Greedy speculative decoding accepts a draft when it equals the base's argmax, so this is the loss
# acceptance follows: on the dense head, held-out first-draft acceptance 53.5% -> 59.0% after 150
# steps and 63.3% after 600 (lr 5e-4, from the head above; a throwaway run before this phase; the
# phase as shipped: 63.4% dense, 65.0% MoE).
MTP_DISTILL_PHASE = dict(_COMMON, batch_size=8, steps=600, lr=5e-4, warmup=20, router_aux_loss_coef=0.01,
                         router_aux_loss="the MTP layer's own Switch loss", target="the base's softmax at i+1")


def base_digest(out_dir: Path) -> str:
    """sha256 over the sorted non-MTP tensors of a checkpoint (name, dtype, shape, raw bytes)."""
    import torch

    from reference.checkpoint import Checkpoint

    ckpt = Checkpoint(out_dir)
    digest = hashlib.sha256()
    try:
        for name in sorted(n for n in ckpt.names() if not n.startswith("mtp.")):
            t = ckpt.view(name)
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    finally:
        ckpt.close()
    return digest.hexdigest()


def mtp_forward(model, batch):
    """MTP logits [B, T, V] for windows batch [B, T + 2] (targets batch[:, 2:]); the base runs
    without gradients."""
    import torch

    length = batch.shape[1] - 2
    with torch.no_grad():
        hidden = model.hidden_states(batch[:, :length])
        embeds = model.model.embed_tokens(batch[:, 1:length + 1])
    positions = torch.arange(1, length + 1).expand(batch.shape[0], length)
    return model.lm_head(model.mtp(hidden, embeds, positions))


def train_mtp(variant: str, out_dir: Path, steps: int | None = None, threads: int = 1, log_every: int = 10,
              distill: bool = False) -> None:
    """Train a fresh MTP head on the data (token i+2), or with `distill` fine-tune the checkpoint's
    head on the base's own next-token distribution (MTP_DISTILL_PHASE); the base stays frozen and
    byte-identical either way."""
    import dataclasses

    import numpy as np
    import torch

    from reference.checkpoint import load_model, save_checkpoint
    from reference.model import Qwen35ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    base = load_model(out_dir, torch.float32)
    before = base_digest(out_dir)
    if distill:
        if base.mtp is None:
            raise SystemExit(f"{out_dir}: no MTP head to distill (train-mtp first)")
        model, cfg = base, base.config
    else:
        cfg = dataclasses.replace(base.config, mtp_num_hidden_layers=1)
        model = Qwen35ForCausalLM(cfg)
        model.init_weights(SEED + 100)
        missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
        assert all(k.startswith("mtp.") for k in missing), missing
    del base
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mtp."))
    hp = dict(MTP_DISTILL_PHASE if distill else MTP_PHASE, **({"steps": steps} if steps else {}))
    tok = load_tokenizer(out_dir / "tokenizer.json")
    stream = torch.from_numpy(tokenize_corpus(tok, corpus_files("train")).astype(np.int64))
    params = [p for n, p in model.mtp.named_parameters()]
    decay = [p for n, p in model.mtp.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.mtp.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=1e-8)
    held_before = mtp_acceptance(model, tok) if distill else None
    gen = torch.Generator().manual_seed(SEED + (101 if distill else 100))
    T, B = hp["seq_len"], hp["batch_size"]
    log, ema, t_start = [], None, time.time()
    model.train()
    for step in range(hp["steps"]):
        starts = torch.randint(0, len(stream) - T - 2, (B,), generator=gen)
        batch = torch.stack([stream[s:s + T + 2] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp)
        logits = mtp_forward(model, batch).float()
        if distill:    # the base's distribution of token i+2, given tokens ..i+1
            with torch.no_grad():
                target = torch.softmax(model(batch[:, :T + 1])[:, 1:].float(), -1)
            ce = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
        else:
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 2:].reshape(-1))
        loss = ce
        blocks = moe_blocks(model.mtp)
        if blocks:
            loss = ce + hp["router_aux_loss_coef"] * load_balancing_loss(
                [b.router_logits for b in blocks], cfg.num_experts, cfg.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
        opt.step()
        ce_val = float(ce.detach())
        ema = ce_val if ema is None else 0.95 * ema + 0.05 * ce_val
        if step % log_every == 0 or step == hp["steps"] - 1:
            rec = {"step": step, "ce": round(ce_val, 4), "ce_ema": round(ema, 4), "lr": round(lr_at(step, hp), 6),
                   "grad_norm": round(float(gnorm), 3), "elapsed_s": round(time.time() - t_start, 1)}
            log.append(rec)
            print(f"[{variant}:mtp] " + " ".join(f"{k}={v}" for k, v in rec.items()), flush=True)
    model.eval()
    staged = Path(str(out_dir) + ".mtp-tmp")
    save_checkpoint(model, staged, dtype=torch.bfloat16, layout="vlm", experts="fused")
    for name in ("config.json", "model.safetensors"):
        (staged / name).replace(out_dir / name)
    shutil.rmtree(staged)
    after = base_digest(out_dir)
    if after != before:
        raise SystemExit(f"{out_dir}: the base tensors changed while adding the MTP head")
    record = json.loads((out_dir / "training.json").read_text())
    phase = {"hyperparameters": hp, "wall_s": round(time.time() - t_start, 1),
             "tokens_seen": hp["steps"] * B * T, "final_train_ce_ema": round(ema, 4), "log": log}
    if distill:
        record["mtp"]["distill"] = dict(phase, heldout_before=held_before)
    else:
        record["mtp"] = {"phase": phase, "base_frozen": True, "base_tensors_sha256": before,
                         "parameters": sum(p.numel() for p in params)}
    record["mtp"]["heldout"] = mtp_acceptance(model, tok)
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["mtp"]["heldout"], indent=1), flush=True)


def mtp_acceptance(model, tok, context: int = 256) -> dict:
    """Teacher-forced on the held-out files, windows of `context` tokens: how often the MTP head's
    first draft (token i+2 from hidden i and token i+1) equals the base's greedy token at i+1 (what
    greedy speculative decoding accepts), and how often a second draft chained on the first (the
    MTP's own output as hidden, vLLM's scheme, within the window) also equals the base's greedy
    token at i+2."""
    import torch

    from qwen35c.eval import perplexity as ppl

    hits1 = hits2 = total1 = total2 = 0
    nll = 0.0
    with torch.no_grad():
        for f in corpus_files("heldout"):
            ids = torch.tensor(ppl.encode_text(tok, f.read_bytes().decode("utf-8")))
            for start in range(0, len(ids) - 3, context):
                window = ids[start:start + context + 2][None]
                n = window.shape[1] - 2
                if n < 2:
                    continue
                greedy = model(window[:, :n + 1])[0].argmax(-1)                  # greedy[j]: token j+1
                hidden = model.hidden_states(window[:, :n])
                positions = torch.arange(1, n + 1)[None]
                h1 = model.mtp(hidden, model.model.embed_tokens(window[:, 1:n + 1]), positions)
                logits1 = model.lm_head(h1)[0]
                nll += float(torch.nn.functional.cross_entropy(logits1.float(), window[0, 2:n + 2], reduction="sum"))
                d1 = logits1.argmax(-1)                                           # draft of token j+2
                ok1 = d1 == greedy[1:n + 1]
                d2 = model.lm_head(model.mtp(h1, model.model.embed_tokens(d1[None]), positions + 1))[0].argmax(-1)
                ok2 = ok1[:n - 1] & (d2[:n - 1] == greedy[2:n + 1])
                hits1, total1 = hits1 + int(ok1.sum()), total1 + n
                hits2, total2 = hits2 + int(ok2.sum()), total2 + n - 1
    return {"context": context, "positions": total1, "accept_1": round(hits1 / total1, 4),
            "accept_2": round(hits2 / total2, 4), "mtp_nll_mean": round(nll / total1, 4)}


# ---- evaluation and model card ------------------------------------------------------------------
EVAL_CONTEXT = 256  # the `qwen35c perplexity` default: windows of 256 tokens, stride 256
PROMPT = "def fibonacci(n):"


def order0_bits_per_byte() -> dict:
    """Order-0 byte model: the byte distribution of the training files (add-one smoothed), scored
    on the held-out bytes. Also the held-out files' own byte entropy (an optimistic order-0)."""
    import numpy as np

    counts = np.ones(256, dtype=np.float64)
    for f in corpus_files("train"):
        counts += np.bincount(np.frombuffer(f.read_bytes(), dtype=np.uint8), minlength=256)
    logp = np.log2(counts / counts.sum())
    held = np.concatenate([np.frombuffer(f.read_bytes(), dtype=np.uint8) for f in corpus_files("heldout")])
    own = np.bincount(held, minlength=256).astype(np.float64)
    own_p = own[own > 0] / own.sum()
    return {"train_distribution_on_heldout": float(-logp[held].mean()),
            "heldout_own_entropy": float(-(own_p * np.log2(own_p)).sum())}


def evaluate_checkpoint(out_dir: Path) -> dict:
    """Held-out perplexity / bits per byte (through qwen35c's evaluator, so `qwen35c perplexity`
    reproduces the numbers), MoE routing histogram on the same text, greedy sample."""
    import torch

    from qwen35c.eval import perplexity as ppl
    from reference import ops
    from reference.checkpoint import load_model

    torch.set_num_threads(1)
    model = load_model(out_dir, dtype=torch.float32)
    tok = ppl.load_tokenizer(out_dir)
    blocks = moe_blocks(model.model)   # the decoder layers (not the MTP head, which this does not run)
    counts = torch.zeros(len(blocks), model.config.num_experts or 1, dtype=torch.long)
    handles = []
    for i, block in enumerate(blocks):
        def hook(module, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1])
            _, experts = ops.moe_route(x, module.gate.weight, module.top_k, module.norm_topk_prob)
            counts[i] += torch.bincount(experts.reshape(-1), minlength=counts.shape[1])
        handles.append(block.register_forward_pre_hook(hook))
    fn = ppl.checkpoint_logits_fn(model)
    root = stdlib_dir()
    per_file, nll, n_tok, n_bytes = {}, 0.0, 0, 0
    for f in corpus_files("heldout"):
        text = f.read_bytes().decode("utf-8")
        r = ppl.evaluate(fn, ppl.encode_text(tok, text), n_bytes=len(text.encode()), context=EVAL_CONTEXT)
        per_file[f.relative_to(root).as_posix()] = round(r["bits_per_byte"], 4)
        nll += r["nll_mean"] * r["tokens"]
        n_tok += r["tokens"]
        n_bytes += r["bytes"]
    for h in handles:
        h.remove()
    out = {"context": EVAL_CONTEXT, "stride": EVAL_CONTEXT, "tokens": n_tok, "bytes": n_bytes,
           "nll_mean": nll / n_tok, "perplexity": math.exp(nll / n_tok),
           "bits_per_byte": nll / math.log(2) / n_bytes, "bits_per_byte_per_file": per_file,
           "order0": order0_bits_per_byte()}
    if blocks:
        frac = counts.double() / counts.sum(dim=1, keepdim=True)
        out["routing"] = {"per_layer": [[round(float(v), 4) for v in row] for row in frac],
                          "overall": [round(float(v), 4) for v in counts.sum(0).double() / counts.sum()],
                          "assignments": int(counts.sum())}
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    eos = tok.token_to_id("<|endoftext|>")
    ids = [eos] + ids
    with torch.no_grad():
        for _ in range(48):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
    out["greedy_prompt"] = PROMPT
    out["greedy_completion"] = tok.decode(ids[1:], skip_special_tokens=False)
    return out


def card(variant: str, out_dir: Path) -> None:
    """Evaluate the shipped checkpoint in `out_dir`, add the metrics to its training.json and
    write its README.md model card."""
    record = json.loads((out_dir / "training.json").read_text())
    t0 = time.time()
    metrics = evaluate_checkpoint(out_dir)
    metrics["eval_wall_s"] = round(time.time() - t0, 1)
    record["heldout"] = metrics
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "README.md").write_text(render_card(variant, out_dir, record))
    print(json.dumps({k: v for k, v in metrics.items() if k != "bits_per_byte_per_file"}, indent=1))


def render_card(variant: str, out_dir: Path, rec: dict) -> str:
    cfg = json.loads((out_dir / "config.json").read_text())["text_config"]
    data, m, phases = rec["data"], rec["heldout"], rec["phases"]
    hp = phases[-1]["hyperparameters"]
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file() and f.name != "README.md")
    name = out_dir.name
    moe = variant == "moe"
    lines = [
        f"# {name}",
        "",
        f"A tiny {'mixture-of-experts ' if moe else ''}model with the Qwen3.5 architecture "
        f"({cfg['model_type']}), trained from scratch on CPU on the Python standard library so "
        "that qwen35c has a real, small model to compile, quantize and measure on a fresh install. "
        f"It has learned much of Python's token statistics ({m['bits_per_byte']:.2f} bits/byte on "
        f"held-out files vs {m['order0']['train_distribution_on_heldout']:.2f} for an order-0 byte "
        f"model) but is heavily undertrained ({sum(ph['tokens_seen'] for ph in phases) / 1e6:.1f} M "
        "tokens): greedy continuations degenerate into repetition. It is for testing toolchains, "
        "not for generation.",
        "",
        "Bundled with qwen35c (`qwen35c.models.bundled(\"" + name + "\")`)"
        + ("; the default model of every command." if not moe else "."),
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {rec['parameters'] / 1e6:.2f} M ({rec['parameters']:,}; embeddings tied) |",
        f"| layers | {cfg['num_hidden_layers']}: {', '.join(cfg['layer_types'])} |",
        f"| hidden | {cfg['hidden_size']} |",
        f"| Gated DeltaNet | {cfg['linear_num_key_heads']} key heads x {cfg['linear_key_head_dim']}, "
        f"{cfg['linear_num_value_heads']} value heads x {cfg['linear_value_head_dim']}, conv kernel "
        f"{cfg['linear_conv_kernel_dim']} |",
        f"| gated attention | {cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} KV heads, "
        f"head_dim {cfg['head_dim']}, partial RoPE {cfg['rope_parameters']['partial_rotary_factor']} "
        f"(theta {cfg['rope_parameters']['rope_theta']:g}) |",
    ]
    if moe:
        lines.append(f"| MLP | {cfg['num_experts']} experts top-{cfg['num_experts_per_tok']} "
                     f"(intermediate {cfg['moe_intermediate_size']}) + gated shared expert "
                     f"(intermediate {cfg['shared_expert_intermediate_size']}) |")
    else:
        lines.append(f"| MLP | SwiGLU, intermediate {cfg['intermediate_size']} |")
    lines += [
        f"| vocabulary | {cfg['vocab_size']} (byte-level BPE, `<|endoftext|>` = {cfg['eos_token_id']}) |",
        f"| files | config.json (official nested schema), model.safetensors (bf16, official names), "
        f"tokenizer.json, tokenizer_config.json, training.json: {size / 1e6:.1f} MB |",
        "",
        "## Held-out metrics",
        "",
        f"Teacher-forced over the {len(data['heldout_files'])} held-out files ({m['bytes']:,} bytes, "
        f"{m['tokens']:,} tokens), windows of {m['context']} tokens, stride {m['stride']}, each file "
        "preceded by `<|endoftext|>`, fp32 compute from the bf16 checkpoint:",
        "",
        "| metric | value |",
        "|---|---|",
        f"| bits per byte | **{m['bits_per_byte']:.3f}** |",
        f"| order-0 byte model (training byte distribution on held-out bytes) | "
        f"{m['order0']['train_distribution_on_heldout']:.3f} bits/byte |",
        f"| held-out files' own byte entropy (optimistic order-0) | "
        f"{m['order0']['heldout_own_entropy']:.3f} bits/byte |",
        f"| nll per token | {m['nll_mean']:.3f} nats |",
        f"| perplexity (per token) | {m['perplexity']:.2f} |",
        "",
        "Per file (bits/byte): " + ", ".join(f"`{k}` {v:.3f}" for k, v in m["bits_per_byte_per_file"].items()),
        "",
        "Reproduce one file: `qwen35c perplexity " + ("qwen35-tiny-moe " if moe else "")
        + "--text $(python -c 'import sysconfig;print(sysconfig.get_paths()[\"stdlib\"])')/textwrap.py`",
        "",
    ]
    if moe:
        r = m["routing"]
        lines += [
            "## Expert routing on the held-out text",
            "",
            f"Share of the {r['assignments']:,} top-{cfg['num_experts_per_tok']} assignments per expert "
            "(trained with the load-balancing loss, last phase: "
            f"{hp['router_aux_loss']}, coefficient {hp['router_aux_loss_coef']}). Within a layer, expert shares range from "
            f"{100 * min(map(min, r['per_layer'])):.1f}% to {100 * max(map(max, r['per_layer'])):.1f}%:",
            "",
            "| layer | " + " | ".join(f"e{e}" for e in range(cfg["num_experts"])) + " |",
            "|---|" + "---|" * cfg["num_experts"],
        ]
        for i, row in enumerate(r["per_layer"]):
            lines.append(f"| {i} | " + " | ".join(f"{100 * v:.1f}%" for v in row) + " |")
        lines.append("| all | " + " | ".join(f"{100 * v:.1f}%" for v in r["overall"]) + " |")
        lines.append("")
    lines += [
        "## Greedy sample",
        "",
        "```python",
        m["greedy_completion"],
        "```",
        "",
        "## Training",
        "",
        f"* Script: `tools/train_tiny.py train --variant {variant}` (seed {rec['seed']}); "
        "all facts below are also in training.json.",
        f"* Data: {data['train_files']} `.py` files ({data['train_bytes']:,} bytes, {data['train_tokens']:,} "
        f"tokens) of the Python {data['python']} standard library, sorted by path, excluding "
        f"directories {', '.join(data['excluded_dirs'])} and the held-out files "
        f"{', '.join(data['heldout_files'])}. Corpus sha256 {data['train_sha256'][:16]}..., held-out "
        f"sha256 {data['heldout_sha256'][:16]}... (other Python versions give other bytes).",
        f"* Tokenizer: byte-level BPE, {rec['tokenizer']['vocab_size']} entries, trained with `tokenizers` on "
        "the training files, Qwen2 pre-tokenizer regex (no normalizer), special tokens "
        + ", ".join(f"`{t}`" for t in rec["tokenizer"]["special_tokens"]) + " appended last.",
        "* Optimisation: "
        + "; then ".join(
            f"phase {i + 1}: {ph['hyperparameters']['steps']} steps of {ph['hyperparameters']['batch_size']} x "
            f"{ph['hyperparameters']['seq_len']} tokens, AdamW lr {ph['hyperparameters']['lr']}, "
            f"{ph['hyperparameters']['warmup']} warmup steps then cosine to "
            f"{ph['hyperparameters']['min_lr_ratio']} x lr"
            + (f", load-balancing loss x {ph['hyperparameters']['router_aux_loss_coef']} "
               f"({ph['hyperparameters']['router_aux_loss']})" if moe else "")
            for i, ph in enumerate(phases))
        + f". Every phase: betas ({hp['beta1']}, {hp['beta2']}), weight decay {hp['weight_decay']}, "
        f"gradient clip {hp['grad_clip']}, fresh optimizer per phase, data windows drawn with seed "
        f"{rec['seed']} + phase index. {sum(ph['tokens_seen'] for ph in phases):,} training tokens in all.",
        f"* Compute: {rec['threads']} CPU thread per model (both models trained at the same time on a "
        f"shared 2-core machine), fp32, torch {rec['software']['torch']}; "
        + " + ".join(f"{ph['wall_s'] / 60:.1f}" for ph in phases)
        + f" min wall. Final training loss (EMA) {phases[-1]['final_train_ce_ema']:.3f} nats/token.",
        *_mtp_card(variant, rec.get("mtp")),
        "",
        "## License and limitations",
        "",
        "Trained on CPython's standard library (PSF License). The model is tiny and undertrained; "
        "use it to test toolchains (parity, quantization error, perplexity deltas), not for generation.",
        "",
    ]
    return "\n".join(lines)


def _mtp_card(variant: str, mtp: dict | None) -> list[str]:
    if not mtp:
        return []
    hp, held = mtp["phase"]["hyperparameters"], mtp["heldout"]
    return [
        f"* MTP head (`mtp.*`, {mtp['parameters']:,} parameters, one gated-attention layer): "
        f"`tools/train_tiny.py train-mtp --variant {variant}`, trained after the base with the base frozen "
        f"(its tensors are byte-identical, sha256 {mtp['base_tensors_sha256'][:16]}... over them in "
        f"training.json), MTP loss only: {hp['steps']} steps of {hp['batch_size']} x {hp['seq_len']} tokens, "
        f"AdamW lr {hp['lr']}, {mtp['phase']['wall_s'] / 60:.1f} min; final loss (EMA) "
        f"{mtp['phase']['final_train_ce_ema']:.3f} nats/token (token i+2)."
        + _distill_card(variant, mtp.get("distill"))
        + f" Held-out, teacher-forced: its first draft equals the base's greedy token "
        f"{100 * held['accept_1']:.1f}% of the time, two chained drafts both {100 * held['accept_2']:.1f}%."]


def _distill_card(variant: str, distill: dict | None) -> str:
    if not distill:
        return ""
    hp, before = distill["hyperparameters"], distill["heldout_before"]
    return (f" Then distilled from the base (`tools/train_tiny.py train-mtp --distill --variant {variant}`): "
            f"{hp['steps']} steps, the same windows, target {hp['target']} (soft cross-entropy), AdamW lr "
            f"{hp['lr']}, {distill['wall_s'] / 60:.1f} min; final loss (EMA) {distill['final_train_ce_ema']:.3f} "
            f"nats/token. First-draft acceptance before it: {100 * before['accept_1']:.1f}% (two chained: "
            f"{100 * before['accept_2']:.1f}%).")


# ---- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tokenizer", help="train the byte-level BPE on the training files")
    p.add_argument("--out", type=Path, default=_ROOT / "build" / "tiny" / "tokenizer.json")
    for name, text in (("train", "train a model, then export it"),
                       ("export", "re-export a trained model from build/tiny/VARIANT/state.pt"),
                       ("card", "evaluate a shipped checkpoint and write its README.md")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--variant", choices=sorted(HPARAMS), required=True)
        p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
        if name != "card":
            p.add_argument("--tokenizer", type=Path, default=_ROOT / "build" / "tiny" / "tokenizer.json")
        if name == "train":
            p.add_argument("--steps", type=int, default=None, help="override every phase's step count")
            p.add_argument("--resume", action="store_true",
                           help="continue from build/tiny/VARIANT (state.pt, training.json)")
            p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("train-mtp", help="train the MTP head of a shipped checkpoint, base frozen")
    p.add_argument("--variant", choices=sorted(HPARAMS), required=True)
    p.add_argument("--out", type=Path, required=True, help="the shipped checkpoint directory (rewritten)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--distill", action="store_true",
                   help="fine-tune the checkpoint's head on the base's own next-token distribution")
    args = parser.parse_args(argv)
    if args.cmd == "train-mtp":
        train_mtp(args.variant, args.out, steps=args.steps, threads=args.threads, distill=args.distill)
    elif args.cmd == "tokenizer":
        train_tokenizer(args.out)
        print(f"wrote {args.out}")
    elif args.cmd == "train":
        if not args.tokenizer.exists():
            train_tokenizer(args.tokenizer)
        train(args.variant, args.tokenizer, args.out, steps=args.steps, threads=args.threads,
              resume=args.resume)
    elif args.cmd == "export":
        export(args.variant, args.tokenizer, args.out)
    elif args.cmd == "card":
        card(args.variant, args.out)


if __name__ == "__main__":
    main()
