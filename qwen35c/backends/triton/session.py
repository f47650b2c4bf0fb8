"""The Triton session: runs an artifact's plan with the kernel library.

Modes (`session.mode` says which ran):
  * "triton-interpreter, fp32 activations" (no CUDA): TRITON_INTERPRET=1 is set before the kernel
    modules are imported (`mode.ensure`); the kernels' Python source runs on CPU, activations and
    the conv state / KV cache are fp32, the packed bf16 / FP8 / INT4 weights are read exactly (the
    interpreter widens those loads exactly), FP8 activation rounding is emulated in fp32
    (fp8_act_quant EMULATE_E4M3). The shipped cubins are not used.
  * "cuda sm_XX, bf16" (a GPU): the Triton version and SM recorded in the artifact must match this
    machine's, else QwenError (never a silent recompile); bf16 activations, fp32 recurrent state.

State (`TritonState`): buffers per the plan's `states`, allocated once per `new_state(batch, max_len)`
and updated in place by the kernels; `q_start` counts each row's tokens. A step's activations live in
a pool planned from the plan's `buffers` (rows by formula of B and T), allocated once per shape and
reused by every layer and every step of the same shape: no per-token allocation besides the
returned logits.

A prompt runs the `prefill` program, from an empty state or on top of one (each row from its own
q_start): chunked GDN from the recurrent / conv states, flash prefill attention over the KV cache;
a right-padded batch of different lengths runs the GDN kernels once per row (the chunk kernels'
cu_seqlens address packed sequences, not padded rows).
"""

from __future__ import annotations

from qwen35c.backends.triton import mode as _mode

_mode.ensure()   # before triton is imported (see mode.py)

from pathlib import Path

import torch

from qwen35c.backends.triton import mode as run_mode
from qwen35c.backends.triton.plan import HOST_OPS, HostOp, Launch, Plan, evaluate, load_plan
from qwen35c.errors import QwenError
from qwen35c.runtime.session import Session, load_tokenizer


def kernel_table() -> dict:
    """Kernel function name -> the @triton.jit object (imported after `mode.ensure`)."""
    from qwen35c.backends.triton.attention import kernel as attention
    from qwen35c.backends.triton.causal_conv1d import kernel as conv
    from qwen35c.backends.triton.elementwise import kernel as elementwise
    from qwen35c.backends.triton.gated_delta_rule import chunk, fused_recurrent
    from qwen35c.backends.triton.gemm import dense, fp8, int4
    from qwen35c.backends.triton.moe import kernel as moe
    from qwen35c.backends.triton.moe import quantized as moe_q
    from qwen35c.backends.triton.rmsnorm import kernel as rmsnorm
    from qwen35c.backends.triton.rope import kernel as rope

    return {
        "gemm_kernel": dense.gemm_kernel, "int4_gemm_kernel": int4.int4_gemm_kernel,
        "fp8_act_quant_kernel": fp8.fp8_act_quant_kernel, "fp8_block_gemm_kernel": fp8.fp8_block_gemm_kernel,
        "rmsnorm_kernel": rmsnorm.rmsnorm_kernel, "gated_rmsnorm_kernel": rmsnorm.gated_rmsnorm_kernel,
        "rope_kernel": rope.rope_kernel, "causal_conv1d_fwd_kernel": conv.causal_conv1d_fwd_kernel,
        "gdn_chunk_prep_kernel": chunk.gdn_chunk_prep_kernel, "gdn_chunk_fwd_h_kernel": chunk.gdn_chunk_fwd_h_kernel,
        "gdn_chunk_fwd_o_kernel": chunk.gdn_chunk_fwd_o_kernel,
        "gdn_fused_recurrent_fwd_kernel": fused_recurrent.gdn_fused_recurrent_fwd_kernel,
        "attn_prefill_kernel": attention.attn_prefill_kernel, "attn_decode_split_kernel": attention.attn_decode_split_kernel,
        "attn_decode_combine_kernel": attention.attn_decode_combine_kernel,
        "kv_cache_write_kernel": elementwise.kv_cache_write_kernel, "swiglu_kernel": elementwise.swiglu_kernel,
        "moe_route_kernel": moe.moe_route_kernel, "moe_gate_up_kernel": moe.moe_gate_up_kernel,
        "moe_down_kernel": moe.moe_down_kernel, "moe_combine_kernel": moe.moe_combine_kernel,
        "moe_gate_up_q_kernel": moe_q.moe_gate_up_q_kernel, "moe_down_q_kernel": moe_q.moe_down_q_kernel,
    }


class TritonState:
    """Per-row token counts and the state tensors of one batch, in the plan's layouts."""

    def __init__(self, plan: Plan, batch: int, max_len: int, act: torch.dtype, device: torch.device):
        self.plan, self.batch, self.capacity = plan, batch, max_len
        self.q_start = torch.zeros(batch, dtype=torch.int64)
        sizes = {"B": batch, "S": max_len}
        dtypes = {"act": act, "f32": torch.float32}
        self.tensors = {s["name"]: torch.zeros([sizes.get(d, d) for d in s["shape"]], dtype=dtypes[s["dtype"]],
                                               device=device) for s in plan.states}

    def row(self, b: int) -> "TritonState":
        """Row b as a batch-1 state over the same memory (every state tensor is batch-major)."""
        view = object.__new__(TritonState)
        view.plan, view.batch, view.capacity = self.plan, 1, self.capacity
        view.q_start = self.q_start[b:b + 1].clone()
        view.tensors = {name: t[b:b + 1] for name, t in self.tensors.items()}
        return view

    def _parts(self, ir_name: str) -> list[str]:
        parts = [s["name"] for s in self.plan.states if s["ir"] == ir_name]
        if not parts:
            raise QwenError(f"no state named {ir_name!r} (known: {sorted({s['ir'] for s in self.plan.states})})")
        return parts

    def ir(self, ir_name: str) -> torch.Tensor:
        """A copy of one state in the IR's layout (conv parts concatenated along channels), fp32."""
        return torch.cat([self.tensors[p].float().cpu() for p in self._parts(ir_name)], dim=1)

    def set_ir(self, ir_name: str, value: torch.Tensor) -> None:
        """Overwrite one state from the IR's layout (tests: a non-zero initial state)."""
        start = 0
        for p in self._parts(ir_name):
            t = self.tensors[p]
            t.copy_(value[:, start:start + t.shape[1]].to(t.dtype))
            start += t.shape[1]


class TritonSession(Session):
    """`load(artifact)` for artifacts built by the triton backend."""

    def __init__(self, directory: Path, manifest: dict, threads: int | None = None):
        from reference.config import load_config

        self.directory, self.manifest = Path(directory), manifest
        backend = manifest["backend"]
        self.backend = backend
        kind = run_mode.ensure()
        if kind == "cuda":
            self.device = torch.device("cuda")
            self.act = torch.bfloat16
            check_compiled(backend)
            sm = _machine_sm()
            self.mode = f"cuda sm_{sm}, bf16"
        else:
            self.device = torch.device("cpu")
            self.act = torch.float32
            self.mode = "triton-interpreter, fp32 activations"
            if threads:
                torch.set_num_threads(threads)
        self.config = load_config(self.directory)
        self.tokenizer = load_tokenizer(self.directory)
        self.plan = load_plan(self.directory, backend)
        self.kernels = kernel_table()
        self.weights = self._load_weights(self.directory / backend["weights"])
        self.vocab = self.plan.model["vocab"]
        self.emulate_fp8 = kind != "cuda"
        self.counts: dict[str, int] = {}           # launches and host ops by name (tests, profiling)
        self._pools: dict[str, tuple[tuple, dict]] = {}
        self._dummy = torch.zeros(1, dtype=self.act, device=self.device)
        self.shipped = ShippedKernels(self.directory, backend, self.kernels) if kind == "cuda" else None
        self._graphs: dict[tuple, "_DecodeGraph"] = {}
        # CUDA graphs need a decode step without host syncs: moe_align's bincount syncs (MoE runs eager)
        self.graphable = kind == "cuda" and not any(getattr(st, "op", None) == "moe_align"
                                                    for st in self.plan.programs["decode"])

    def _load_weights(self, path: Path) -> dict[str, torch.Tensor]:
        from reference.safetensors_io import SafetensorsFile

        try:
            file = SafetensorsFile(path)
        except Exception as err:  # noqa: BLE001 - a damaged file is reported by name
            raise QwenError(f"{path}: cannot read packed weights ({err})") from None
        out = {}
        for w in self.plan.weights:
            if w.name not in file.keys():
                raise QwenError(f"{path}: packed weight {w.name} is missing")
            t = file.view(w.name)
            if list(t.shape) != w.shape:
                raise QwenError(f"{path}: packed weight {w.name} has shape {list(t.shape)}, the plan says {w.shape}")
            out[w.name] = t.to(self.device) if self.device.type != "cpu" else t
        return out

    # ----------------------------------------------------------------------------- public API

    def new_state(self, batch: int, max_len: int) -> TritonState:
        return TritonState(self.plan, batch, max_len, self.act, self.device)

    @torch.no_grad()
    def prefill(self, ids, state, lengths=None, last_only=False):
        ids = torch.as_tensor(ids, dtype=torch.long)
        batch, length = ids.shape
        lengths = torch.full((batch,), length, dtype=torch.long) if lengths is None else \
            torch.as_tensor(lengths, dtype=torch.long).cpu()
        if lengths.shape != (batch,) or (lengths < 0).any() or (lengths > length).any():
            raise QwenError(f"lengths {lengths.tolist()} must give each of the {batch} rows 0..{length} tokens")
        self._check(state, batch, lengths)
        logits = self._run("prefill", ids, state, lengths, last_only)
        state.q_start += lengths
        return logits

    @torch.no_grad()
    def decode(self, ids, state):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1, 1)
        ones = torch.ones(ids.shape[0], dtype=torch.long)
        self._check(state, ids.shape[0], ones)
        if self.graphable:
            return self._decode_graph(ids, state)
        logits = self._run("decode", ids, state, ones, False)
        state.q_start += 1
        return logits

    def _decode_graph(self, ids, state):
        """GPU decode through a CUDA graph captured once per (state, batch): the pool, the states and
        the index tensors are static; a step copies the ids in and replays."""
        key = (id(state), state.batch, state.capacity)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _DecodeGraph(self, state)
        logits = graph.step(ids)
        state.q_start += 1
        return logits

    def logits(self, ids):
        return self.prefill(ids, self.new_state(ids.shape[0], ids.shape[1]))

    # ------------------------------------------------------------------------------- internals

    def _check(self, state: TritonState, batch: int, lengths: torch.Tensor) -> None:
        if batch != state.batch:
            raise QwenError(f"batch {batch} does not match the state's batch {state.batch}")
        need = int((state.q_start + lengths).max()) if batch else 0
        if need > state.capacity:
            raise QwenError(f"the state holds {state.capacity} positions; this step needs {need}")

    def _pool(self, program: str, env: dict) -> dict:
        """The activation buffers of `program` for this shape: allocated once, reused while it lasts."""
        key = tuple(env[k] for k in ("B", "T", "S", "R"))
        cached = self._pools.get(program)
        if cached is not None and cached[0] == key:
            return cached[1]
        dtypes = {"act": self.act, "f32": torch.float32, "i32": torch.int32,
                  "xq": torch.float32 if self.emulate_fp8 else torch.float8_e4m3fn}
        pool = {}
        for name, spec in self.plan.buffers.items():
            rows = evaluate(str(spec["shape"][0]), env)
            pool[name] = torch.empty(max(rows, 1), spec["shape"][1], dtype=dtypes[spec["dtype"]], device=self.device)
            if self.device.type == "cpu" and pool[name].is_floating_point():
                pool[name].fill_(float("nan"))   # interpreter: a read of a value no kernel wrote shows as NaN
        self._pools[program] = (key, pool)
        return pool

    def _env(self, program: str, batch: int, length: int, capacity: int, last_only: bool) -> dict:
        """The program's integer variables for this shape (B, T, S, then the plan's formulas)."""
        env = {"B": batch, "T": length, "S": capacity, "NSPLIT": 1}
        if program == "decode":
            from qwen35c.backends.triton.attention.kernel import decode_num_splits

            env["NSPLIT"] = decode_num_splits(batch, self.plan.model.get("kv_heads", 1), capacity)
        for name, formula in self.plan.variables[program]:
            env[name] = evaluate(formula, env)
        env["R"] = batch if last_only else env["M"]
        return env

    def _run(self, program: str, ids, state: TritonState, lengths: torch.Tensor, last_only: bool) -> torch.Tensor:
        batch, length = ids.shape
        env = self._env(program, batch, length, state.capacity, last_only)
        pool = self._pool(program, env)
        ctx = _Context(self, program, ids, state, lengths, last_only, env, pool)
        ctx.run_all(self.plan.programs[program])
        rows = env["R"]
        logits = pool["logits"][:rows].float().cpu().clone()
        return logits.view(batch, 1 if last_only else length, self.vocab)


class _Context:
    """One run of a program: the bindings (pool, weights, state, host-made index tensors) and the steps."""

    def __init__(self, session, program, ids, state, lengths, last_only, env, pool):
        self.s, self.program, self.ids, self.state = session, program, ids, state
        self.lengths, self.last_only, self.env, self.pool = lengths, last_only, env, pool
        self.ctl: dict[str, torch.Tensor] = {}
        self.static: dict[str, torch.Tensor] | None = None    # CUDA-graph inputs (q_start, lengths on device)
        self.alias: dict[str, str] = {}
        self.row: int | None = None            # per-row GDN launches: the row being run
        self.rows: list[dict] = []

    # --- bindings
    def bind(self, binding: str, launch: Launch | None = None):
        kind, _, value = binding.partition(":")
        if kind == "buf":
            name, _, offset = value.partition("+")
            name = self.alias.get(name, name)
            t = self.pool[name].view(-1)
            start = int(offset or 0)
            if self.row is not None and self.s.plan.buffers[name]["shape"][0] == "M":
                start += self.row * self.env["T"] * self.s.plan.buffers[name]["shape"][1]
            return t[start:]
        if kind == "w":
            return self.s.weights[value]
        if kind == "state":
            t = self.state.tensors[value]
            return t[self.row:self.row + 1] if self.row is not None else t
        if kind == "ctl":
            if self.row is not None and value in self.rows[self.row]:
                return self.rows[self.row][value]
            return self.ctl[value]
        if kind == "int":
            return evaluate(value, self.env)
        if kind == "float":
            return float(value)
        if binding == "dummy":
            return self.s._dummy
        raise QwenError(f"plan binding {binding!r} is not understood")

    def constexpr(self, value):
        if value == "$EMULATE_E4M3":
            return self.s.emulate_fp8
        return value

    # --- steps
    def run_all(self, steps: list) -> None:
        i = 0
        while i < len(steps):
            step = steps[i]
            if isinstance(step, HostOp):
                if step.op not in HOST_OPS:
                    raise QwenError(f"plan host op {step.op!r} is not one of {sorted(HOST_OPS)}")
                getattr(self, "host_" + step.op)(step)
                self.s.counts["host:" + step.op] = self.s.counts.get("host:" + step.op, 0) + 1
            elif step.per_row and self.ragged:
                group = [step]                     # a row's GDN launches run together (they share scratch)
                while i + 1 < len(steps) and isinstance(steps[i + 1], Launch) and steps[i + 1].per_row:
                    i += 1
                    group.append(steps[i])
                for r in range(len(self.rows)):
                    self.row = r
                    self.env.update(self.rows[r]["env"])
                    for launch in group:
                        self.launch(launch)
                self.row = None
                self.env.update(self.whole_env)
                self.zero_padding({name for launch in group for name in launch.pads})
            else:
                self.launch(step)
            i += 1

    def launch(self, step: Launch) -> None:
        grid = tuple(evaluate(g, self.env) for g in step.grid)
        if 0 in grid:
            return
        fn = self.s.kernels.get(step.kernel)
        if fn is None:
            raise QwenError(f"plan launch {step.spec}: kernel {step.kernel!r} is not in the kernel library")
        args = {p: self.bind(b, step) for p, b in step.args}
        const = {k: self.constexpr(v) for k, v in step.const.items()}
        if self.s.shipped is not None:
            self.s.shipped.launch(step.spec, grid, args, const)   # the artifact's cubin, never recompiled
        else:
            fn[grid](**args, **const, num_warps=step.num_warps, num_stages=step.num_stages)
        self.s.counts[step.spec] = self.s.counts.get(step.spec, 0) + 1

    def zero_padding(self, names: set[str]) -> None:
        """Rows past each row's length in buffers a per-row group wrote for valid tokens only: zero, so
        the layers after it (MoE routing, the LM head) read defined values, never a stale or NaN pool."""
        batch, length = self.ids.shape
        for name in names:
            rows = self.pool[self.alias.get(name, name)][:batch * length].view(batch, length, -1)
            for b, n in enumerate(self.lengths.tolist()):
                rows[b, n:].zero_()

    # --- host ops (HOST_OPS)
    def host_embedding(self, step: HostOp) -> None:
        table = self.bind(step.args["table"])
        out = self.pool[step.args["out"].split(":", 1)[1]]
        ids = (self.static["ids"] if self.static is not None else self.ids.to(self.s.device)).reshape(-1)
        out[:ids.numel()].copy_(table.index_select(0, ids))

    def host_positions(self, step: HostOp) -> None:
        device = self.s.device
        batch, length = self.ids.shape
        if self.static is not None:                       # CUDA graph: device tensors only, no host sync
            q_start, lengths = self.static["q_start"], self.static["lengths"]
        else:
            q_start, lengths = self.state.q_start.to(device), self.lengths.to(device)
        pos = (q_start[:, None] + torch.arange(length, device=device)[None, :]).reshape(-1)
        self.ctl.update(q_start=q_start.to(torch.int32), lengths=lengths.to(torch.int32),
                        kv_lens=(q_start + lengths).to(torch.int32), pos=pos.to(torch.int32))

    def host_gdn_index(self, step: HostOp) -> None:
        chunk = int(step.args["chunk"])
        batch, length = self.ids.shape
        device = self.s.device
        lens = self.lengths.tolist()
        self.ragged = any(n != length for n in lens)
        i32 = dict(dtype=torch.int32, device=device)
        nt = -(-length // chunk)
        self.ctl.update(
            cu_seqlens=torch.arange(0, (batch + 1) * length, length, **i32) if length else torch.zeros(batch + 1, **i32),
            chunk_indices=torch.stack([torch.arange(batch, **i32).repeat_interleave(nt),
                                       torch.arange(nt, **i32).repeat(batch)], dim=1).contiguous(),
            chunk_offsets=torch.arange(0, (batch + 1) * nt, nt, **i32) if nt else torch.zeros(batch + 1, **i32))
        self.whole_env = {"NC": batch * nt, "N": batch}
        self.env.update(self.whole_env)
        self.rows = []
        for n in lens:                                     # one packed sequence per row, at its own offset
            c = -(-n // chunk)
            self.rows.append({"cu_seqlens": torch.tensor([0, n], **i32),
                              "chunk_indices": torch.stack([torch.zeros(c, **i32), torch.arange(c, **i32)], 1).contiguous(),
                              "chunk_offsets": torch.tensor([0, c], **i32), "env": {"NC": c, "N": 1}})

    ragged = False

    def host_moe_align(self, step: HostOp) -> None:
        from qwen35c.backends.triton.moe.kernel import moe_align

        ids = self.bind(step.args["ids"])[:self.env["SLOTS"]].view(self.env["M"], -1)
        sorted_slots, block_expert, num_padded = moe_align(ids, int(step.args["experts"]), int(step.args["block_m"]))
        if sorted_slots.numel() != self.env["CAP"]:
            raise QwenError(f"moe_align capacity {sorted_slots.numel()} != the plan's CAP {self.env['CAP']}")
        self.ctl.update(sorted_slots=sorted_slots, block_expert=block_expert, num_padded=num_padded)

    def host_select_rows(self, step: HostOp) -> None:
        x, out = step.args["x"].split(":", 1)[1], step.args["out"].split(":", 1)[1]
        if not self.last_only:
            self.alias[out] = x                            # every row: the LM head reads x itself
            return
        length = self.ids.shape[1]
        index = (torch.arange(self.ids.shape[0]) * length + (self.lengths - 1).clamp_min(0)).to(self.s.device)
        self.pool[out][:index.numel()].copy_(self.pool[x].index_select(0, index))


class ShippedKernels:
    """The artifact's compiled kernels (kernels/<spec>.{cubin,json}), loaded through Triton's
    CompiledKernel with the signature they were compiled with: nothing is compiled here."""

    def __init__(self, directory: Path, backend: dict, table: dict):
        import json

        from triton.compiler import ASTSource
        from triton.compiler.compiler import CompiledKernel

        entry = backend["kernels"]
        hashes = {f["file"]: f["sha256"] for f in entry["files"]}
        self.kernels = {}
        for spec in entry["specialisations"]:
            meta_file = directory / entry["dir"] / f"{spec}.json"
            cubin = directory / entry["dir"] / f"{spec}.cubin"
            try:
                info = json.loads(meta_file.read_text())["qwen35c"]
            except (OSError, ValueError, KeyError) as err:
                raise QwenError(f"{meta_file}: cannot read the kernel's metadata ({err})") from None
            fn = table[info["kernel"]]
            src = ASTSource(fn=fn, signature=info["signature"], constexprs=info["constexprs"])
            group = {meta_file.name: str(meta_file), cubin.name: str(cubin)}
            compiled = CompiledKernel(src, group, hashes.get(f"{entry['dir']}/{cubin.name}", spec))
            self.kernels[spec] = (compiled, list(fn.arg_names))

    def launch(self, spec: str, grid: tuple, args: dict, const: dict) -> None:
        if spec not in self.kernels:
            raise QwenError(f"the artifact ships no compiled kernel {spec!r}")
        compiled, names = self.kernels[spec]
        grid = tuple(grid) + (1,) * (3 - len(grid))
        compiled[grid](*[args[n] if n in args else const[n] for n in names])


class _DecodeGraph:
    """One captured decode step for a state (GPU): static ids / q_start / lengths in, logits out."""

    def __init__(self, session: "TritonSession", state: TritonState):
        self.session, self.state = session, state
        batch, device = state.batch, session.device
        self.static = {"ids": torch.zeros(batch, 1, dtype=torch.long, device=device),
                       "q_start": state.q_start.to(device), "lengths": torch.ones(batch, dtype=torch.long, device=device)}
        self.graph = None

    def _run(self):
        s, state = self.session, self.state
        env = s._env("decode", state.batch, 1, state.capacity, False)
        pool = s._pool("decode", env)
        ctx = _Context(s, "decode", self.static["ids"], state, torch.ones(state.batch, dtype=torch.long), False, env, pool)
        ctx.static = self.static
        ctx.run_all(s.plan.programs["decode"])
        return pool["logits"]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.static["ids"].copy_(ids.to(self.static["ids"].device))
        self.static["q_start"].copy_(self.state.q_start)   # the host count is the truth (prefills move it too)
        if self.graph is None:
            saved = {k: t.clone() for k, t in self.state.tensors.items()}   # the warm-up must not move the state
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):               # loads the kernels' modules, allocates the pool
                self._run()
            torch.cuda.current_stream().wait_stream(stream)
            for k, t in saved.items():
                self.state.tensors[k].copy_(t)
            del saved
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):            # recorded, not run: the replay is the step
                self.logits = self._run()
        self.graph.replay()
        rows = self.state.batch
        return self.logits[:rows].float().cpu().clone().view(rows, 1, self.session.vocab)


def _machine_sm() -> int:
    major, minor = torch.cuda.get_device_capability(0)
    return major * 10 + minor


def check_compiled(backend: dict, sm: int | None = None) -> None:
    """On a GPU: the artifact's kernels must have been compiled by this Triton for this SM (`sm`:
    this machine's, read from the GPU when not given)."""
    import triton

    kernels = backend.get("kernels") or {}
    want_version, want_sm = kernels.get("triton_version"), kernels.get("sm")
    if want_version is None:
        raise QwenError("triton artifact: no compiled kernels recorded (built without --ship-kernels); "
                        "refusing to compile on load")
    if want_version != triton.__version__:
        raise QwenError(f"triton artifact: kernels compiled with Triton {want_version}, this machine has "
                        f"{triton.__version__}; rebuild the artifact (no silent recompile)")
    sm = _machine_sm() if sm is None else sm
    if int(want_sm) != sm:
        raise QwenError(f"triton artifact: kernels compiled for sm_{want_sm}, this GPU is sm_{sm}; rebuild for it")


__all__ = ["TritonSession", "TritonState", "check_compiled", "kernel_table"]
