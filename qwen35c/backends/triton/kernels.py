"""Ship the compiled kernels a plan launches: cubin + PTX + metadata per specialisation, for one SM.

`ship(plan, sm, out_dir)` compiles (in a child Python without TRITON_INTERPRET, since the kernels of
this process may be the interpreter's) every specialisation the plan uses with `triton.compile` and a
`GPUTarget("cuda", sm, 32)`, the same driver as `aot.py`, and writes `kernels/<spec>.{cubin,ptx,json}`.
It returns the manifest's `backend["kernels"]` section: the Triton version, the SM, and per file its
sha256. Signatures come from the plan's bindings: pointer dtypes from the buffer / weight / state
dtypes with bf16 activations (the GPU mode), integers i32 (i64 where the kernel's strides need it),
floats fp32; constexprs as the plan gives them (EMULATE_E4M3 = False on a GPU). Every argument is
passed at launch, none specialised on its value (a 1 stays an i32).

On load (`session.check_compiled`) a different Triton version or SM is refused; the GPU session
launches these binaries through Triton's CompiledKernel, never recompiling.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from qwen35c.errors import QwenError

KERNEL_DIR = "kernels"
I64_ARGS = {("attn_decode_split_kernel", "stride_kb"), ("attn_decode_split_kernel", "stride_vb"),
            ("kv_cache_write_kernel", "stride_cb")}
_ACT, _TAGS = "bf16", {"act": "bf16", "f32": "fp32", "i32": "i32", "xq": "fp8e4nv",
                        "bf16": "bf16", "f8e4m3": "fp8e4nv", "u8": "u8"}


def signature(plan_json: dict, launch: dict) -> tuple[dict, dict, tuple]:
    """(signature, constexprs, aligned) of one launch of a plan (JSON form)."""
    weights = {w["name"]: w["dtype"] for w in plan_json["weights"]}
    states = {s["name"]: s["dtype"] for s in plan_json["states"]}
    sig, aligned = {}, []
    for param, binding in launch["args"]:
        kind, _, value = binding.partition(":")
        if kind == "buf":
            sig[param] = "*" + _TAGS[plan_json["buffers"][value.partition("+")[0]]["dtype"]]
        elif kind == "w":
            sig[param] = "*" + _TAGS[weights[value]]
        elif kind == "state":
            sig[param] = "*" + _TAGS[states[value]]
        elif kind == "ctl":
            sig[param] = "*i32"
        elif binding == "dummy":
            sig[param] = "*" + _ACT
        elif kind == "int":
            sig[param] = "i64" if (launch["kernel"], param) in I64_ARGS else "i32"
        elif kind == "float":
            sig[param] = "fp32"
        else:
            raise QwenError(f"plan launch {launch['spec']}: binding {binding!r} has no signature type")
    const = {k: (False if v == "$EMULATE_E4M3" else v) for k, v in launch["const"].items()}
    return sig, const, tuple(aligned)


def _specs(plan_json: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for steps in plan_json["programs"].values():
        for step in steps:
            if "launch" in step:
                out.setdefault(step["launch"]["spec"], step["launch"])
    return out


def compile_plan(plan_json: dict, sm: int, out_dir: Path, only: list[str] | None = None) -> list[dict]:
    """In this process (TRITON_INTERPRET must be unset): compile and write every specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen35c.backends.triton.aot import ptx_version_for
    from qwen35c.backends.triton.session import kernel_table

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise QwenError("kernel shipping must run without TRITON_INTERPRET (use ship())")
    table = kernel_table()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec, launch in sorted(_specs(plan_json).items()):
        if only is not None and spec not in only:
            continue
        fn = table[launch["kernel"]]
        sig, const, _ = signature(plan_json, launch)
        full = {a: sig.get(a, "constexpr") for a in fn.arg_names}
        missing = [a for a in fn.arg_names if a not in sig and a not in const]
        if missing:
            raise QwenError(f"plan launch {spec}: kernel arguments {missing} are not bound")
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if full[a].startswith("*")}
        src = ASTSource(fn=fn, signature=full, constexprs=const, attrs=attrs)
        options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"],
                   "ptx_version": ptx_version_for(sm)}
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=options)
        except Exception as err:  # noqa: BLE001 - named in one line
            raise QwenError(f"kernel {spec} ({launch['kernel']}) does not compile for sm_{sm}: "
                            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}") from None
        meta = dict(compiled.metadata._asdict())          # Triton's own metadata (CompiledKernel reads it)
        meta["qwen35c"] = {"spec": spec, "kernel": launch["kernel"], "signature": full, "constexprs": const}
        for ext, data in (("cubin", compiled.asm["cubin"]), ("ptx", compiled.asm["ptx"].encode()),
                          ("json", json.dumps(meta, sort_keys=True, default=vars).encode())):
            (out_dir / f"{spec}.{ext}").write_bytes(data)
        rows.append({"spec": spec, "kernel": launch["kernel"], "name": compiled.metadata.name})
    return rows


def ship(plan, sm: int, out_dir, only: list[str] | None = None, timeout: float = 1800) -> dict:
    """Compile the plan's specialisations for `sm` into out_dir/kernels (child process); the manifest entry."""
    import triton

    out_dir = Path(out_dir)
    plan_file = out_dir / "plan.json"
    if not plan_file.is_file():
        plan_file.write_text(json.dumps(plan.to_json(), indent=1, sort_keys=True) + "\n")
    import qwen35c

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(qwen35c.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    from qwen35c.backends.triton.mode import AOT_ENV

    env[AOT_ENV] = "1"
    cmd = [sys.executable, "-m", "qwen35c.backends.triton.kernels", str(plan_file), str(sm),
           str(out_dir / KERNEL_DIR)] + ([",".join(only)] if only else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise QwenError(f"compiling the plan's kernels for sm_{sm} failed: {tail[:300]}")
    rows = json.loads(done.stdout)
    files = []
    for row in rows:
        for ext in ("cubin", "ptx", "json"):
            path = out_dir / KERNEL_DIR / f"{row['spec']}.{ext}"
            files.append({"file": f"{KERNEL_DIR}/{path.name}", "spec": row["spec"],
                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return {"triton_version": triton.__version__, "sm": sm, "dir": KERNEL_DIR,
            "specialisations": [r["spec"] for r in rows], "files": files,
            "cpu_mode": "the Triton interpreter runs the kernels' Python source; these binaries are for sm_%d" % sm}


def _main(argv: list[str]) -> None:
    plan_file, sm, out = argv[0], int(argv[1]), Path(argv[2])
    only = argv[3].split(",") if len(argv) > 3 else None
    plan_json = json.loads(Path(plan_file).read_text())
    rows = compile_plan(plan_json, sm, out, only)
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    _main(sys.argv[1:])


__all__ = ["KERNEL_DIR", "compile_plan", "ship", "signature"]
