"""Ahead-of-time compilation of the Triton kernel library for the target SMs (no GPU needed).

Contract between kernel families and this module:
  * every subpackage of `qwen35c.backends.triton` that ships kernels defines, in its `__init__.py`,
    `aot_specs(shapes: ModelShapes) -> list[KernelSpec]`: the concrete launches it ships for a
    model's shapes (signature, constexprs, warps, stages, the lowest SM it supports);
  * `discover_specs(shapes)` walks the subpackages and collects them; nothing is listed by hand.
The compile driver, resource report and spill gate live below the contract (owned by the kernel
library's AOT work).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelShapes:
    """The model dimensions a kernel launch is specialised for (from the config; see the notes' table)."""

    name: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    intermediate_size: int  # dense MLP; 0 for MoE models
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    partial_rotary_factor: float = 0.25


SHAPES: dict[str, ModelShapes] = {
    "0.8b": ModelShapes("0.8b", 1024, 8, 2, 256, 16, 16, 128, 128, 4, 3584),
    "35b-a3b": ModelShapes("35b-a3b", 2048, 16, 2, 256, 16, 32, 128, 128, 4, 0, 256, 8, 512, 512),
}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel configuration to compile ahead of time."""

    name: str                    # unique, e.g. "gdn_chunk_fwd_h[0.8b]"
    fn: Any                      # the @triton.jit function
    signature: dict[str, str]    # Triton signature: {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    constexprs: dict[str, Any]   # values for the constexpr parameters
    num_warps: int = 4
    num_stages: int = 2
    min_sm: int = 80             # FP8 kernels: 89
    options: dict[str, Any] = field(default_factory=dict)
    aligned: tuple[str, ...] = ()  # int args known to be multiples of 16 (pointers are always 16-aligned)


def discover_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """All kernel configurations the library ships for `shapes`, from every family's `aot_specs`."""
    import qwen35c.backends.triton as pkg

    specs: list[KernelSpec] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        factory = getattr(module, "aot_specs", None)
        if factory is not None:
            specs.extend(factory(shapes))
    return specs


# ------------------------------------------------------------------------------------------------
# Compile driver (no GPU needed): triton.compile for a GPUTarget, resource usage from cuobjdump.
# ------------------------------------------------------------------------------------------------

import json
import os
import re
import subprocess
import sys
import tempfile
import time

TARGET_SMS: dict[str, int] = {"a100": 80, "l40s": 89, "h100": 90, "h200": 90, "b200": 100}
MAX_PTX_VERSION = 90  # PTX ISA 9.0: the newest the CUDA 13.0 drivers (580.x) can JIT


def target_sm(target: str) -> int:
    """SM of a target name: its prefix picks it (`h100-fp8` -> 90). cpu* has no GPU kernels."""
    from qwen35c.errors import QwenError

    name = target.lower()
    if name.startswith("cpu"):
        raise QwenError(f"no GPU kernels for target {target}")
    for prefix, sm in TARGET_SMS.items():
        if name.startswith(prefix):
            return sm
    valid = ", ".join(f"{p}*" for p in TARGET_SMS)
    raise QwenError(f"unknown target {target!r}; valid targets start with one of: {valid} (cpu* has no GPU kernels)")


def make_spec(name: str, fn: Any, args: dict[str, str], constexprs: dict[str, Any], *,
              num_warps: int = 4, num_stages: int = 2, min_sm: int = 80,
              aligned: tuple[str, ...] = ()) -> KernelSpec:
    """A KernelSpec whose signature follows the kernel's own argument order.

    `args` types every runtime argument ("*bf16", "i32", "fp32"...); `constexprs` gives every
    constexpr. A name missing from both is an error, so a spec cannot drift from its kernel.
    """
    arg_names = list(fn.arg_names)
    missing = [a for a in arg_names if a not in args and a not in constexprs]
    extra = [a for a in list(args) + list(constexprs) if a not in arg_names]
    if missing or extra:
        raise ValueError(f"spec {name}: missing {missing}, unknown {extra}")
    signature = {a: (args[a] if a in args else "constexpr") for a in arg_names}
    return KernelSpec(name, fn, signature, dict(constexprs), num_warps, num_stages, min_sm,
                      aligned=tuple(aligned))


def torch_dtype_tag(dtype) -> str:
    """Triton's signature tag for a torch dtype (bf16, fp16, fp32, fp8e4nv, u8, i32, i64)."""
    import torch

    tags = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float8_e4m3fn: "fp8e4nv", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
    return tags[dtype]


@dataclass
class CompileRecord:
    """What one AOT compile produced. spill_bytes is cuobjdump's STACK (+LOCAL): >0 means spills."""

    name: str
    sm: int
    kernel: str = ""
    num_warps: int = 0
    num_stages: int = 0
    registers: int | None = None
    shared_bytes: int | None = None
    spill_bytes: int | None = None
    compile_s: float = 0.0
    ptx_version: str = ""
    skipped: str | None = None   # why it was not compiled for this SM (e.g. "needs sm_89")
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptx_version_for(sm: int) -> int:
    """The default PTX version of the ptxas Triton uses for `sm`, capped at MAX_PTX_VERSION."""
    try:
        from triton.backends.nvidia import compiler as nv

        default = nv.ptx_get_version(nv.get_ptxas(sm).version)
    except Exception:  # older Triton layouts: fall back to what their bundled ptxas accepts
        default = 88 if sm < 90 else MAX_PTX_VERSION
    return min(default, MAX_PTX_VERSION)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage: dict[str, int] = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.findall(rf"\b{key}:(\d+)", out)
        usage[key] = max(int(v) for v in found) if found else 0
    return usage


def compile(spec: KernelSpec, sm: int) -> CompileRecord:  # noqa: A001 - the contract's name
    """AOT-compile one spec for `sm`; errors are returned in the record, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = CompileRecord(spec.name, sm, num_warps=spec.num_warps, num_stages=spec.num_stages)
    if sm < spec.min_sm:
        record.skipped = f"needs sm_{spec.min_sm}"
        return record
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        record.error = "TRITON_INTERPRET is set: kernels were built for the interpreter; compile in a clean process"
        return record
    names = list(spec.signature)
    attrs = {}
    for index, arg in enumerate(names):
        kind = spec.signature[arg]
        if kind.startswith("*") or arg in spec.aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages,
               "ptx_version": ptx_version_for(sm), **spec.options}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=options)
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as err:  # a compile failure is a result to report, not a crash
        record.compile_s = round(time.perf_counter() - start, 3)
        record.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        return record
    record.compile_s = round(time.perf_counter() - start, 3)
    record.kernel = compiled.metadata.name
    record.registers = usage["REG"]
    record.shared_bytes = max(int(compiled.metadata.shared), usage["SHARED"])
    record.spill_bytes = usage["STACK"] + usage["LOCAL"]
    version = re.search(r"^\.version (\S+)", compiled.asm["ptx"], re.MULTILINE)
    record.ptx_version = version.group(1) if version else ""
    return record


def compile_all(sms: list[int], shapes: list[str] | None = None, only: list[str] | None = None,
                fresh_cache: bool = False) -> list[CompileRecord]:
    """Compile every discovered spec (or the named subset) for each SM; one record per (spec, SM)."""
    shape_names = shapes or list(SHAPES)
    previous = os.environ.get("TRITON_CACHE_DIR")
    tmp = tempfile.TemporaryDirectory() if fresh_cache else None
    if tmp is not None:
        os.environ["TRITON_CACHE_DIR"] = tmp.name
    try:
        records: list[CompileRecord] = []
        seen: set[str] = set()
        for shape_name in shape_names:
            for spec in discover_specs(SHAPES[shape_name]):
                if spec.name in seen or (only is not None and spec.name not in only):
                    continue
                seen.add(spec.name)
                for sm in sms:
                    records.append(compile(spec, sm))
        return records
    finally:
        if tmp is not None:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous
            tmp.cleanup()


def compile_all_subprocess(sms: list[int], shapes: list[str] | None = None, only: list[str] | None = None,
                           fresh_cache: bool = False, timeout: float | None = None) -> list[CompileRecord]:
    """`compile_all` in a child Python with TRITON_INTERPRET removed (safe from interpreter tests)."""
    import qwen35c

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(qwen35c.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "qwen35c.backends.triton.aot", "--sm", ",".join(map(str, sms))]
    if shapes:
        cmd += ["--shapes", ",".join(shapes)]
    if only:
        cmd += ["--only", ",".join(only)]
    if fresh_cache:
        cmd += ["--fresh-cache"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"AOT subprocess failed ({out.returncode}): {out.stderr[-2000:]}")
    return [CompileRecord(**row) for row in json.loads(out.stdout)]


def _main(argv: list[str] | None = None) -> None:
    import argparse
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description="AOT-compile the Triton kernel library; prints JSON records")
    parser.add_argument("--sm", required=True, help="comma-separated SMs, e.g. 80,90")
    parser.add_argument("--shapes", default="", help="comma-separated SHAPES keys (default: all)")
    parser.add_argument("--only", default="", help="comma-separated spec names (default: all)")
    parser.add_argument("--fresh-cache", action="store_true")
    ns = parser.parse_args(argv)
    records = compile_all([int(s) for s in ns.sm.split(",")],
                          shapes=[s for s in ns.shapes.split(",") if s] or None,
                          only=[s for s in ns.only.split(",") if s] or None,
                          fresh_cache=ns.fresh_cache)
    json.dump([r.as_dict() for r in records], sys.stdout)


if __name__ == "__main__":
    _main()
