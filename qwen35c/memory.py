"""Honest memory limits: estimated peak RSS of an artifact at run time and of a build, and what this
machine has available.

Estimates are computed from shapes alone (config + the target's precision), never by loading weights:

  artifact (ONNX CPU)  = process base + weights (fp32; INT4 units at 4 bits + one fp32 scale per
                         group, as MatMulNBits packs them; an INT4 artifact's embedding table is
                         mapped and only gathered rows are read) + prepacked copies (a tied fp32
                         LM head: the Gather keeps the initializer, the head's MatMul packs its own
                         copy) + ORT's run buffers (ORT_WORKING copies of the workload's logits) +
                         state / KV for the workload + activations (logits dominate); calibrated on
                         the 0.8b and 4b presets (see the constants);
  build (streamed)     = the largest of its phases: quantization (a few copies of the largest decoder
                         layer + calibration activations + one unit's Hessian / rows; the head is
                         quantized from the mapped checkpoint in row chunks), emission (tensor by
                         tensor: two of the largest, a tensor over 64 MB written in 64 MB row chunks)
                         and the check, in two phases that never overlap: the artifact above runs the
                         prompt set and its logits are recorded to a scratch file, then it is dropped
                         and the streamed reference runs (a layer and, for an fp32 check, its [V, H]
                         head: a quantized check's emulated head is dequantized in slices, its lookups
                         gather checkpoint rows + one case's logits from each side).

`available_bytes()` is /proc/meminfo MemAvailable, lowered to a cgroup (v2 or v1) limit minus usage
when one is set. Numbers are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Estimate", "artifact_peak", "build_peak", "verify_peak", "available_bytes", "check_blocker", "shortfall",
           "estimates_for"]

PROCESS_BASE = 300 << 20      # python + torch + onnxruntime imported (measured ~220-260 MiB)
# Calibrated with `python tools/artifact_peak.py ART full` (a lean session, as the checks load it) on
# the 0.8b and 4b presets' cpu-int4 artifacts (loaded session 698 / 2678 MiB, run peak over it 534 /
# 724 MiB; estimated 1484 / 3632 MiB in all against 1232 / 3402 measured) and the 0.8b cpu one (4100,
# +581; 4843 against 4681). Before lean runs unmapped their freed blocks (freed_blocks_unmapped) a
# run held 713 / ~1130-1250 MiB, and this was 5.
ORT_WORKING = 2               # ORT's run buffers, in copies of the workload's logits [tokens, V] fp32
INT4_PACKED = 1.3             # MatMulNBits' prepacked INT4 blocks (codes, scales, block sums) / ours
INT4_FIXED = 150 << 20        # ... plus what the INT4 kernels allocate once
# the build check's workload (qwen35c.verify.quick_parity): its longest prompt and its batch; the full
# prompt set's (an int4 / FP8 build with quantized activations checks on it, build._check)
CHECK_PROMPT = 129
CHECK_BATCH, CHECK_MAX_LEN = 3, 64 + 8 + 1
CALIB_TOKENS = 8192           # qwen35c.quant.calibrate.CALIBRATION_TOKENS
CALIB_ROWS = 4096             # rows kept per unit


@dataclass
class Estimate:
    total: int
    parts: dict[str, int]

    def to_json(self) -> dict:
        return {"total_bytes": self.total, "parts_bytes": dict(self.parts)}


def _skeleton(config):
    from reference.model import Qwen35ForCausalLM

    with torch.device("meta"):
        return Qwen35ForCausalLM(config)


def _weight_bytes(config, precision: str) -> tuple[int, int]:
    """(artifact weight bytes, bytes of the tied head's second copy) for a precision: fp32 | int4."""
    from qwen35c.quant.policy import plan_model

    model = _skeleton(config)
    quantized: set[str] = set()
    if precision == "int4":     # the cpu-int4 target's own recipe (attention, GDN, the head included)
        from qwen35c.passes.manager import parse_pipeline
        from qwen35c.targets import TARGETS

        recipe = parse_pipeline(f"quantize{{{TARGETS['cpu-int4'].quantize}}}")[0].options.recipe()
        # a stacked expert tensor counts as INT4 through its per-expert units (quantized_moe)
        quantized = {d.name if d.expert is None else d.source for d in plan_model(model, recipe) if d.quantize}
    total = INT4_FIXED if quantized else 0

    def packed(name: str, n: int) -> int:      # codes (4 or 8 bits) + one fp32 scale a group, as prepacked
        return int(INT4_PACKED * (n * recipe.unit_bits(name) // 8 + 4 * n // recipe.group_size))

    params = dict(model.named_parameters())
    if quantized and config.tie_word_embeddings and "lm_head.weight" in quantized:
        params["lm_head.weight"] = params["model.embed_tokens.weight"]     # the tied head's own codes
    for name, p in params.items():
        if name.startswith("mtp.") or (quantized and name == "model.embed_tokens.weight"):
            continue    # an INT4 artifact's lookup table is mapped and only its gathered rows are read
        total += packed(name, p.numel()) if name in quantized else 4 * p.numel()
    # a tied fp32 head: ORT prepacks its own copy of the table for the head's GEMM; a shared quantized
    # table (tied-embedding=shared): its codes stay mapped whole next to MatMulNBits' prepacked copy
    table = config.vocab_size * config.hidden_size
    tied = 0
    if config.tie_word_embeddings and "lm_head.weight" not in quantized:
        tied = 4 * table
    elif config.tie_word_embeddings and recipe.tied_embedding == "shared":
        tied = table * recipe.unit_bits("lm_head.weight") // 8 + 4 * table // recipe.group_size
    return total, tied


def _state_bytes(config, batch: int, max_len: int) -> int:
    gdn = config.layer_types.count("linear_attention")
    attn = config.num_hidden_layers - gdn
    conv = gdn * config.conv_dim * (config.linear_conv_kernel_dim - 1) * 4
    recurrent = gdn * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    kv = attn * 2 * config.num_key_value_heads * config.head_dim * max_len * 4
    return batch * (conv + recurrent + kv)


def _activation_bytes(config, tokens: int) -> int:
    """Logits [tokens, V] fp32 plus the widest intermediate [tokens, max(I, C, 2 Hq hd)] a few times."""
    widest = max(config.intermediate_size or 0, config.conv_dim, 2 * config.num_attention_heads * config.head_dim,
                 (config.moe_intermediate_size or 0) * max(config.num_experts_per_tok, 1))
    return tokens * (config.vocab_size + 4 * widest) * 4


def artifact_peak(config, precision: str = "fp32", batch: int = CHECK_BATCH, max_len: int = CHECK_MAX_LEN,
                  tokens: int = CHECK_PROMPT) -> Estimate:
    """Peak RSS of an ONNX CPU artifact running `batch` rows of up to `max_len` tokens and a
    prefill of `tokens` (defaults: the build check's workload)."""
    weights, tied = _weight_bytes(config, precision)
    parts = {"process": PROCESS_BASE, "weights": weights, "prepacked": tied,
             "ort_working": ORT_WORKING * max(tokens, batch * max_len) * config.vocab_size * 4,
             "state": _state_bytes(config, batch, max_len), "activations": _activation_bytes(config, max(tokens, batch * max_len))}
    return Estimate(sum(parts.values()), parts)


def _layer_bytes(config) -> int:
    from reference.stream import layer_bytes

    return max(layer_bytes(config, torch.float32))


def _largest_tensor(config) -> int:
    """Bytes of the largest parameter in fp32 (the embedding, or a stacked expert tensor)."""
    return 4 * max(p.numel() for p in _skeleton(config).parameters())


STREAM_CHUNK = 64 << 20       # qwen35c.backends.onnx.emit.STREAM_BYTES
HEAD_CHUNK = 256 << 20        # fp32 rows of the head GPTQ works on at a time (quant.algorithms)
LOSS_WINDOW_LOGITS = 512 << 20  # logits held per model and pass in verify's quantization loss (WINDOW_LOGITS_BYTES)


def check_reference_peak(config, precision: str = "fp32") -> int:
    """The reference side of a check: one streamed layer (and the one being loaded), the fp32 head of
    an fp32 check (a quantized check's emulated head is dequantized in slices, its lookups gather
    checkpoint rows), the prompt set's activations, one case's logits from each side."""
    head = 4 * config.vocab_size * config.hidden_size if precision == "fp32" else 0
    return PROCESS_BASE + head + 2 * _layer_bytes(config) + 2 * CHECK_PROMPT * config.vocab_size * 4


def build_peak(config, precision: str = "fp32", calibrated: bool | None = None, check: bool = True) -> Estimate:
    """Peak RSS of a streamed `qwen35c build` (the largest phase; see the module docstring)."""
    layer = _layer_bytes(config)
    table = 4 * config.vocab_size * config.hidden_size
    calibrated = precision == "int4" if calibrated is None else calibrated
    widest_k = max(config.intermediate_size or 0, config.moe_intermediate_size or 0, config.hidden_size)
    quantize = PROCESS_BASE + min(table, HEAD_CHUNK) + 3 * layer
    if calibrated:
        quantize += 3 * CALIB_TOKENS * config.hidden_size * 4 + 3 * CALIB_ROWS * widest_k * 4 + 4 * widest_k ** 2 * 4
    phases = {"quantize": quantize if precision != "fp32" else 0,
              "emit": PROCESS_BASE + 2 * min(_largest_tensor(config), max(layer, STREAM_CHUNK))}
    if check:   # the artifact runs first and is dropped before the reference runs (verify.record)
        phases["check_artifact"] = artifact_peak(config, precision).total
        phases["check_reference"] = check_reference_peak(config, precision)
    worst = max(phases.values())
    return Estimate(worst, phases)


def available_bytes() -> int | None:
    """MemAvailable, or less under a cgroup memory limit; None when neither can be read."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            room = max(int(limit) - usage, 0)
            avail = room if avail is None else min(avail, room)
    return avail


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def verify_peak(config, precision: str = "fp32", quantized: bool = False) -> Estimate:
    """Peak RSS of `qwen35c verify` on an ONNX CPU artifact: the largest of its phases, which run one
    after the other (the artifact on the full prompt set; the parity check's streamed reference; the
    MTP head's check, the artifact joined with its head; for a quantized artifact the
    quantization-loss pass, whose full-precision reference holds its fp32 [V, H] head and two
    windows' logits)."""
    artifact = artifact_peak(config, precision)
    phases = {"artifact": artifact.total, "reference": check_reference_peak(config, precision)}
    if config.mtp_num_hidden_layers:
        # the mtp check runs the model joined with its head (`backends.onnx.fuse`) next to the streamed
        # reference's MTP: the head's fp32 layer twice, the head's LM head prepacking its own copy of
        # the table, and the reference's side (its emulated head's codes touched whole). Calibrated on
        # the 0.8b preset's artifacts, `/usr/bin/time -v qwen35c verify ART` (--skip quantization for
        # cpu-int4: random checkpoint): cpu-int4 (8-bit shared head) 3,018,400 KB against 3.13 GiB
        # estimated; cpu 8,290,132 KB, which one more fp32 table does not cover: two are counted
        # (8.15 GiB; the phase was not estimated at all before, 4.7 GiB in all)
        mtp = 4 * sum(p.numel() for n, p in _skeleton(config).named_parameters() if n.startswith("mtp."))
        table = artifact.parts["prepacked"] or 4 * config.vocab_size * config.hidden_size
        packed = int(INT4_PACKED * table) + table if precision == "int4" else 2 * table
        phases["mtp"] = artifact.total + 2 * mtp + packed + phases["reference"] - PROCESS_BASE
    if quantized:
        phases["quantization_loss"] = check_reference_peak(config, "fp32") + 2 * LOSS_WINDOW_LOGITS
    return Estimate(max(phases.values()), phases)


def estimates_for(config) -> dict:
    """What `qwen35c inspect` reports: per precision, the artifact's runtime peak, the build's peak
    and `verify`'s."""
    out = {}
    for target, precision in (("cpu", "fp32"), ("cpu-int4", "int4")):
        out[target] = {"artifact_runtime_peak": artifact_peak(config, precision).to_json(),
                       "build_peak": build_peak(config, precision).to_json(),
                       "verify_peak": verify_peak(config, precision, precision != "fp32").to_json()}
    return out


def shortfall(need: int, what: str) -> str | None:
    """Why `what`, estimated to need `need` bytes at its peak, cannot run here (more than this
    machine's free memory plus what this process already holds), or None when it fits (or nothing
    can be read)."""
    available = available_bytes()
    if available is None:
        return None
    have = available + current_rss()
    if need <= have:
        return None
    return (f"not enough memory for {what}: it needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available "
            f"(MemAvailable / cgroup limit)")


def check_blocker(config, precision: str) -> str | None:
    """Why the build's own check cannot run here, or None when it fits (`shortfall`)."""
    parts = build_peak(config, precision).parts
    return shortfall(max(parts["check_artifact"], parts["check_reference"]),
                     f"the check (the larger of the artifact's runtime peak ~{parts['check_artifact'] / 2**30:.1f} "
                     f"GiB and the streamed reference's ~{parts['check_reference'] / 2**30:.1f} GiB, which run "
                     f"one after the other)")
