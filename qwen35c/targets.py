"""The target registry: what `qwen35c build --target T` means.

A target is a piece of hardware (a CPU or a GPU's SM), a default backend, a pass pipeline and a
precision recipe. Every target of the design is listed here, built or not: `build` fails with a
clear message (exit 2) for a target whose backend or quantization is not implemented yet, rather
than produce something else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qwen35c.errors import QwenError

@dataclass(frozen=True)
class Target:
    name: str
    hardware: str
    sm: int | None              # CUDA compute capability x10 (90 = sm_90); None for CPUs
    backend: str
    weights: str                # weight precision recipe
    activations: str
    precision: str              # parity gate class: fp32 | bf16 | fp8 | int4
    pipeline: str               # named pipeline or pipeline text
    runner: str                 # CI runner label
    quantize: str | None = None  # quantize pass options, None when unquantized
    quantize_before: str = "insert-state"   # the pass the quantize pass is inserted before

    def to_json(self) -> dict:
        return asdict(self)

    def build_blocker(self, backend: str | None = None, quantize: str | None = None) -> str | None:
        """Why this target cannot be built by this install, or None. `quantize` overrides the
        target's quantize options (`qwen35c build --quantize`)."""
        from qwen35c.backends import REGISTRY

        backend = backend or self.backend
        if backend not in REGISTRY:
            return (f"target '{self.name}' needs the '{backend}' backend, which is not implemented yet "
                    f"(implemented: {', '.join(REGISTRY)})")
        if self.sm is not None and backend == "onnx":
            # why: an ONNX Runtime CPU artifact labelled with a GPU target would be neither verifiable
            # on that GPU nor what the target promises; the CPU emulation is asked for explicitly.
            hint = (f"; for a CPU-runnable {self.weights} emulation artifact use --target cpu --quantize "
                    f"{self.quantize.split('=', 1)[1]}" if self.quantize else "")
            return f"target '{self.name}' is a GPU target; the onnx backend builds CPU targets only{hint}"
        if self.sm is None and backend != "onnx":
            return f"target '{self.name}' is a CPU target; only the onnx backend builds CPU targets"
        scheme = (quantize or self.quantize or "").replace("scheme=", "").split(" ", 1)[0]
        if backend == "tensorrt" and scheme and not (scheme.startswith("int4") or scheme == "fp8-block128"):
            return (f"target '{self.name}': the tensorrt backend lowers INT4 (W4A16) and FP8 block-128 recipes, "
                    f"not '{scheme}'")
        if quantize is not None or self.quantize is not None:
            from qwen35c.passes.manager import parse_pipeline

            try:
                parse_pipeline(self.full_pipeline(quantize))
            except QwenError as err:
                what = f"--quantize '{quantize}'" if quantize is not None else f"the {self.weights} recipe"
                return f"target '{self.name}': {what} is not a valid quantization ({err})"
        elif self.precision != "fp32" and backend == "onnx":
            return f"target '{self.name}' ({self.precision}) is not supported by the onnx backend"
        return None

    def full_pipeline(self, quantize: str | None = None) -> str:
        """The target's named pipeline with `quantize{...}` inserted right before the pass named by
        `quantize_before` (by default `insert-state`: after the match passes, which the triton backend's
        fused kernels need on plain linears, and after lower-moe, whose grouped experts the triton
        packer quantizes itself; the CPU targets quantize before lower-moe, so each whole moe becomes a
        quantized_moe (ORT's QMoE) and fuse-projections concatenates packed weights), replacing a
        quantize pass already there. `quantize` ("SCHEME [opt=value ...]" or
        "scheme=SCHEME ...") replaces the target's own quantize options."""
        from qwen35c.passes.manager import parse_pipeline

        if quantize is not None and not quantize.startswith("scheme="):
            quantize = "scheme=" + quantize
        quantize = quantize or self.quantize
        if quantize is None:
            return self.pipeline
        passes = [p.to_text() for p in parse_pipeline(self.pipeline) if p.name != "quantize"]
        names = [text.split("{", 1)[0] for text in passes]
        at = names.index(self.quantize_before) if self.quantize_before in names else len(passes)
        return ",".join(passes[:at] + [f"quantize{{{quantize}}}"] + passes[at:])


# cpu-int4 quantizes attention q/k/v/o and the GDN in_proj_qkv / in_proj_z / out_proj as well as the
# MLPs / experts the INT4 policy takes by default (issue 16: they were 0.93 GB of fp32 per 0.8B decode
# step); in_proj_a / in_proj_b (gates), conv, A_log, dt_bias, norms and the router stay fp32.
# The (tied) LM head takes int8 activations too, as the peers run it (ORT GenAI: accuracy_level 4;
# llama.cpp: q8 activations): with fp32 ones (accuracy_level 0) it took a third of a 0.8B decode step,
# for no measurable quality (bundled models, README) now that the lowering gate knows its noise floor.
# Its codes are 8-bit (head-bits=8, amax/127 per 128-group) and the embedding lookup gathers the same
# table (tied-embedding=shared: GatherBlockQuantized), and the INT4 scales are searched per group
# (scales=mse), GPTQ visiting columns by decreasing Hessian diagonal (act-order, static groups: the
# layout is unchanged). On qwen35-tiny, in llama.cpp's KL protocol, mean KL 9.17e-3 -> 3.54e-3 against
# Q4_0's 4.44e-3 (an INT4 head alone cost 3.0e-3 of it; README "Quantization"), for a head that streams
# twice the bytes (0.8B decode x0.84-0.90) and a tied table a quarter of the fp32 one.
# Routed experts are INT4 too (the policy's default), as one quantized_moe per layer, lowered to ONNX
# Runtime's QMoE, whose GEMMs take fp32 inputs: the emulation says so through fp32-activations.
# strict-globs=false: these globs name every projection of the family; a model cut to fewer layers than
# the full-attention interval has no self_attn at all (and must still build).
CPU_INT4_INCLUDE = ("*.self_attn.[qkvo]_proj.weight;*.linear_attn.in_proj_[qz]*.weight;*.linear_attn.out_proj.weight;"
                    "lm_head.weight")
CPU_INT4_FP32_ACTIVATIONS = "*.mlp.experts.*"

_T = Target
TARGETS: dict[str, Target] = {t.name: t for t in (
    # `--quantize` goes before lower-moe (a whole moe op can become quantized_moe) and so before
    # fuse-projections, which fuses the packed parts of sibling quantized linears
    _T("cpu", "any CPU", None, "onnx", "fp32", "fp32", "fp32", "onnx-cpu", "ubuntu-latest",
       quantize_before="lower-moe"),
    _T("cpu-int4", "any CPU", None, "onnx", "int4 g128 GPTQ (symmetric, act-order, searched scales), every projection and "
       "routed expert; the tied LM head and embedding one 8-bit table",
       "int8 dynamic per token per group (MatMulNBits accuracy_level 4; routed experts fp32)", "int4", "onnx-cpu", "ubuntu-latest",
       quantize="scheme=int4-gptq group-size=128 act-order=true scales=mse head-bits=8 tied-embedding=shared "
                "activations=int8 "
                "expert-groups=fit fp32-activations=" + CPU_INT4_FP32_ACTIVATIONS +
                " strict-globs=false include=" + CPU_INT4_INCLUDE, quantize_before="lower-moe"),
    _T("a100-bf16", "NVIDIA A100", 80, "triton", "bf16", "bf16", "bf16", "triton", "gpu-a100"),
    _T("a100-int4", "NVIDIA A100", 80, "triton", "int4 g128 GPTQ W4A16", "bf16", "int4", "triton", "gpu-a100",
       quantize="scheme=int4-gptq group-size=128"),
    _T("l40s-fp8", "NVIDIA L40S", 89, "triton", "fp8 block 128x128", "fp8 dynamic per-token 1x128", "fp8",
       "triton", "gpu-l40s", quantize="scheme=fp8-block128"),
    _T("h100-bf16", "NVIDIA H100", 90, "triton", "bf16", "bf16", "bf16", "triton", "gpu-h100"),
    _T("h100-fp8", "NVIDIA H100", 90, "triton", "fp8 block 128x128", "fp8 per-token-group 1x128", "fp8",
       "triton", "gpu-h100", quantize="scheme=fp8-block128"),
    _T("h200-fp8", "NVIDIA H200", 90, "triton", "fp8 block 128x128", "fp8 per-token-group 1x128", "fp8",
       "triton", "gpu-h200", quantize="scheme=fp8-block128"),
    _T("b200-fp8", "NVIDIA B200", 100, "triton", "fp8 block 128x128 (NVFP4 later)", "fp8 per-token-group 1x128",
       "fp8", "triton", "gpu-b200", quantize="scheme=fp8-block128"),
)}

# parity gates per precision (design: notes/quantization.md §7.3)
GATES = {
    "fp32": {"max_abs_logit": 1e-3, "top1": 1.0},
    "bf16": {"kl_mean": 1e-3, "top1": 0.99},
    "fp8": {"kl_mean": 5e-3, "top1": 0.96},
    "int4": {"kl_mean": 0.05, "top1": 0.90},
    # artifact vs the quantization-emulating reference when activations are quantized at run time
    # (FP8 dynamic / static, INT4 with int8 activations): a last-bit fp32 difference upstream (ORT's
    # or a Triton kernel's accumulation order vs torch's) flips an E4M3 / int8 rounding and the flips
    # propagate, so max |Δlogit| is not near-fp32 by construction. The gate is these limits or,
    # where the model itself is noisier, relative to its noise floor (`qwen35c.verify.noise_floor`:
    # the emulation against itself with ±1 ulp at every quantizer input, on the same prompts):
    # KL <= max(kl_mean, floor_kl_factor x floor KL), top-1 >= min(top1, floor top-1 - the margin), the
    # margin floor_top1_margin or, where wider, 3 standard deviations of two top-1 rates on the floor's
    # positions (`verify._top1_noise`: flat-logit models part by points between equally noisy runs).
    # Measured on the bundled qwen35-tiny, FP8 block-128, the full prompt set (575 positions): the
    # floor is KL 2.8-3.2e-4 / top-1 0.981-0.983 (3 seeds); lowering bugs move KL 4-7x the floor
    # (per-token scales 2.1e-3, no activation rounding 1.3e-3, 64-wide groups 2.1e-3) but top-1 only
    # 1-3 points (0.970, 0.963, 0.951): KL is the statistic that tells a bug from the noise.
    # Each FP8 and int8 lowering is checked exactly, per linear, by tests/quant/test_quant_lowering.py.
    "quantized-activations": {"kl_mean": 5e-4, "top1": 0.98, "floor_kl_factor": 2.0, "floor_top1_margin": 0.02},
}


def lowering_gate(record: dict | None) -> str:
    """The gate of an artifact vs its emulating reference: fp32 for full-precision and weight-only
    recipes; with run-time activation quantization, `quantized-activations` (see GATES)."""
    if record is None:
        return "fp32"
    return "fp32" if record["recipe"].get("activations", "none") == "none" else "quantized-activations"


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise QwenError(f"unknown target '{name}' (known: {', '.join(TARGETS)})") from None


def machine_sm() -> int | None:
    """This machine's GPU compute capability x10, or None without a CUDA GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return major * 10 + minor
    except Exception:  # noqa: BLE001 - no usable CUDA is the answer
        pass
    return None


def runnable_here(target: Target, backend: str | None = None) -> tuple[bool, str]:
    """Whether this machine can execute the target's artifact (built by `backend`), and why not.
    A triton artifact runs anywhere: its own kernels on the GPU it was built for, or the same
    kernels under the Triton interpreter where there is no CUDA GPU."""
    if target.sm is None:
        return True, "CPU target"
    if backend == "tensorrt":
        return True, ("a TensorRT bundle: its model.onnx runs on ONNX Runtime's CPU provider, the plugin nodes "
                      "by their reference implementations (the engine is stage 2: `qwen35c engine`)")
    if (backend or target.backend) == "triton" and machine_sm() is None:
        return True, f"no GPU here: the artifact's kernels run under the Triton interpreter (sm_{target.sm} not used)"
    sm = machine_sm()
    if sm is None:
        return False, f"target '{target.name}' needs an sm_{target.sm} GPU; this machine has none"
    if sm != target.sm:
        return False, f"target '{target.name}' is built for sm_{target.sm}; this machine has sm_{sm}"
    return True, f"sm_{sm}"


__all__ = ["GATES", "TARGETS", "Target", "get_target", "lowering_gate", "machine_sm", "runnable_here"]
