"""`qwen35c inspect [MODEL]`: what a checkpoint holds, without loading its weights."""

from __future__ import annotations

import collections

import click

from qwen35c.commands._common import emit_json


def summarize(path, preset: str | None = None, scan: bool = True) -> dict:
    """Config, layer pattern, parameter counts, weight bytes by dtype, state and KV sizes; with
    `scan`, the tensors holding NaN or infinite values (streamed, one tensor at a time). A preset
    (no checkpoint) counts its weights as bf16."""
    import torch

    from reference.checkpoint import Checkpoint, preset_config
    from reference.config import load_config
    from reference.model import Qwen35ForCausalLM

    config = preset_config(preset) if preset else load_config(path)
    by_dtype: dict[str, int] = collections.Counter()
    nonfinite: list[str] | None = None
    has_mtp = bool(preset) and config.mtp_num_hidden_layers > 0
    if not preset:
        ckpt = Checkpoint(path)
        nonfinite = [] if scan else None
        try:
            for name in ckpt.names():
                file = ckpt.files[ckpt.location[name]]
                numel = 1
                for d in file.shape(name):
                    numel *= d
                by_dtype[str(file.dtype(name)).removeprefix("torch.")] += numel * file.dtype(name).itemsize
                if scan and file.dtype(name) in (torch.float32, torch.bfloat16, torch.float16):
                    if not bool(torch.isfinite(ckpt.view(name)).all()):
                        nonfinite.append(name)
                    ckpt.release(name)
            has_mtp = any(n.startswith("mtp.") for n in ckpt.names())
        finally:
            ckpt.close()
    if not has_mtp:
        config.mtp_num_hidden_layers = 0
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config)
    total = expert = mtp = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if name.startswith("mtp."):
            mtp += n
        elif ".mlp.experts." in name:
            expert += n
    active = total - mtp - expert
    if config.is_moe and expert:
        active += expert * config.num_experts_per_tok // config.num_experts
    gdn = config.layer_types.count("linear_attention")
    attn = config.layer_types.count("full_attention")
    model_bytes = 2  # bf16 activations/caches
    conv_state = gdn * config.conv_dim * (config.linear_conv_kernel_dim - 1) * model_bytes
    recurrent = gdn * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    kv_per_token = attn * 2 * config.num_key_value_heads * config.head_dim * model_bytes
    pattern = "".join("L" if t == "linear_attention" else "A" for t in config.layer_types)
    if preset:
        by_dtype["bfloat16 (preset, not stored)"] = total * 2
    return {
        "path": str(path) if path else f"preset {preset}", "model_type": config.model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
        "layer_pattern": pattern, "linear_attention_layers": gdn, "full_attention_layers": attn,
        "attention": {"q_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                      "head_dim": config.head_dim, "rotary_dim": config.rotary_dim, "rope_theta": config.rope_theta},
        "linear_attention": {"key_heads": config.linear_num_key_heads, "value_heads": config.linear_num_value_heads,
                             "key_dim": config.linear_key_head_dim, "value_dim": config.linear_value_head_dim,
                             "conv_kernel": config.linear_conv_kernel_dim},
        "moe": ({"experts": config.num_experts, "top_k": config.num_experts_per_tok,
                 "expert_intermediate": config.moe_intermediate_size,
                 "shared_intermediate": config.shared_expert_intermediate_size} if config.is_moe else None),
        "tie_word_embeddings": config.tie_word_embeddings, "mtp": has_mtp,
        "parameters_total": total, "parameters_active_per_token": active, "parameters_mtp": mtp,
        "weight_bytes_by_dtype": dict(by_dtype),
        "state_bytes_per_sequence": {"conv_bf16": conv_state, "recurrent_fp32": recurrent,
                                     "total": conv_state + recurrent},
        "kv_bytes_per_token_bf16": kv_per_token,
        "nonfinite_tensors": nonfinite,
        "memory_estimates": memory_estimates(config),
    }


def memory_estimates(config) -> dict:
    """Estimated peak RSS per CPU target: the artifact at run time (the build check's workload), the
    streamed build and `verify` (`qwen35c.memory`); with this machine's available memory."""
    from qwen35c.memory import available_bytes, estimates_for

    return {"targets": estimates_for(config), "available_bytes": available_bytes(),
            "workload": "artifact: the full prompt set (T=129, batch 5/64/33 + 8 decode steps); build and verify: "
                        "their largest phase"}


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
        n /= 1024
    return str(n)


@click.command("inspect")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-scan", is_flag=True, help="Do not read the weights to look for NaN / infinite values.")
def command(model, as_json, no_scan):
    """Summarize MODEL (a checkpoint directory, a bundled model or a preset; default: the bundled
    dense model). Exit 2 (after the summary) when a weight holds NaN or infinite values."""
    from rich.console import Console
    from rich.table import Table

    from qwen35c.models import resolve_model_or_preset

    ref = resolve_model_or_preset(model)
    info = summarize(ref.path, ref.preset, scan=not no_scan)
    if as_json:
        emit_json(info)
        _refuse_nonfinite(info)
        return
    table = Table(title=f"{info['path']}  ({info['model_type']})", show_header=False)
    rows = [
        ("layers", f"{info['num_layers']}: {info['linear_attention_layers']} Gated DeltaNet + "
                   f"{info['full_attention_layers']} gated attention"),
        ("pattern", info["layer_pattern"]),
        ("hidden / vocab", f"{info['hidden_size']} / {info['vocab_size']}"),
        ("attention", "q {q_heads}, kv {kv_heads}, head_dim {head_dim}, rotary {rotary_dim}".format(**info["attention"])),
        ("linear attention", "k {key_heads}, v {value_heads} heads, dk {key_dim}, dv {value_dim}, conv {conv_kernel}"
         .format(**info["linear_attention"])),
    ]
    if info["moe"]:
        rows.append(("experts", "{experts} x top-{top_k}, I={expert_intermediate}, shared {shared_intermediate}"
                     .format(**info["moe"])))
    rows += [
        ("parameters", f"{info['parameters_total'] / 1e6:.2f} M total, "
                       f"{info['parameters_active_per_token'] / 1e6:.2f} M active per token"
                       + (f" (+ MTP {info['parameters_mtp'] / 1e6:.2f} M)" if info["mtp"] else "")),
        ("weights", ", ".join(f"{k}: {_human(v)}" for k, v in info["weight_bytes_by_dtype"].items())),
        ("state / sequence", f"{_human(info['state_bytes_per_sequence']['total'])} "
                             f"(conv {_human(info['state_bytes_per_sequence']['conv_bf16'])}, "
                             f"recurrent fp32 {_human(info['state_bytes_per_sequence']['recurrent_fp32'])})"),
        ("KV cache / token", _human(info["kv_bytes_per_token_bf16"])),
        ("tied lm_head", str(info["tie_word_embeddings"])),
        ("finite weights", "not scanned" if info["nonfinite_tensors"] is None else
         "yes" if not info["nonfinite_tensors"] else "NO: " + ", ".join(info["nonfinite_tensors"][:5])),
    ]
    memory = info["memory_estimates"]
    for target, est in memory["targets"].items():
        rows.append((f"peak RSS ({target})",
                     f"artifact ~{_human(est['artifact_runtime_peak']['total_bytes'])}, "
                     f"build ~{_human(est['build_peak']['total_bytes'])}, "
                     f"verify ~{_human(est['verify_peak']['total_bytes'])} (estimates)"))
    if memory["available_bytes"] is not None:
        rows.append(("memory available", _human(memory["available_bytes"])))
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    _refuse_nonfinite(info)


def _refuse_nonfinite(info: dict) -> None:
    from qwen35c.errors import QwenError

    bad = info["nonfinite_tensors"]
    if bad:
        raise QwenError(f"{info['path']}: tensor '{bad[0]}' holds NaN or infinite values"
                        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
