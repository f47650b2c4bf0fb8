"""The ONNX Runtime session over a built artifact: prefill / decode / generate.

State buffers are owned by the session and allocated once per `new_state(batch, max_len)`: two
sets of OrtValues (A and B) of every conv / recurrent state tensor. A step reads one set and writes
the other through IOBinding, then they swap roles, so no state tensor is allocated per token and
ORT never reads and writes one of those buffers in the same step. The KV caches are the exception:
one buffer each, bound as both input and output, because the graph writes only the new positions
into it (GroupQueryAttention detects past/present sharing one buffer; the ScatterElements fallback
skips its copy when they alias); two sets would copy the whole cache every step. Each direction
(A -> B, B -> A) has its own IOBinding with every state tensor bound once; a step rebinds only
the four small inputs and the logits, the one fresh tensor ([B, P, V]) per step.

Threads, spin-waiting and the prefill chunk come from `qwen35c.settings` (QWEN35C_THREADS,
QWEN35C_ORT_SPIN, QWEN35C_PREFILL_CHUNK) unless the caller passes them.

Everything here is numpy: `prefill_array`, `decode_array` and `extend_array` are the steps, and
`prefill`, `decode` and `extend` wrap their results as torch tensors (importing torch then), so
generating from an artifact never imports torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from qwen35c.artifact import artifact_file
from qwen35c.errors import QwenError
from qwen35c.runtime.session import Session, load_tokenizer
from qwen35c.settings import settings
from reference.heap import drop_mapped_pages, freed_blocks_unmapped

_NP = {"f32": np.float32, "f16": np.float16, "i64": np.int64}


_PER_LOGIT = ("logits", "draft")    # outputs at the logit positions [B, P, ...]; the others are per token


def _following(ids: np.ndarray, lengths: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """The joined graph's `next_ids` (fuse.py): at positions before judged[b] the next input token,
    from judged[b] on -1 (the model's own argmax), past lengths[b] 0 (padding)."""
    following = np.zeros_like(ids)
    following[:, :-1] = ids[:, 1:]
    at = np.arange(ids.shape[1])
    following[at >= judged[:, None]] = -1
    following[at >= lengths[:, None]] = 0
    return following


def in_place(spec: dict) -> bool:
    """KV caches are updated in place: the graph's ScatterElements writes only the new positions
    when its output buffer is its input buffer (ORT skips the copy when they alias), and nothing
    else reads the old cache. Double-buffering them would copy the whole cache every step."""
    return "S" in spec["shape"]


def zeros(shape, dtype, commit: bool) -> np.ndarray:
    """np.zeros maps a large array to the shared zero page, so its page faults come when a kernel
    first writes it. The double-buffered states are written whole every step: they are written
    now (else the first decode steps take the faults: 0.8B, 36 MiB of recurrent state, ~1 ms a
    step averaged over 16 steps). The KV caches are written a position at a time and stay lazy,
    so a large capacity costs memory only as it fills."""
    if not commit:
        return np.zeros(shape, dtype=dtype)
    array = np.empty(shape, dtype=dtype)
    array.fill(0)
    return array


class OnnxState:
    """Per-row token counts and the double-buffered state OrtValues."""

    def __init__(self, specs, batch: int, max_len: int):
        self.batch, self.capacity = batch, max_len
        self.q_start = np.zeros(batch, dtype=np.int64)
        sizes = {"B": batch, "S": max_len}
        self.shared = {spec["name"] for spec in specs if in_place(spec)}   # one buffer for both sets
        arrays = {spec["name"]: zeros([sizes[d] if isinstance(d, str) else d for d in spec["shape"]],
                                      _NP[spec["dtype"]], commit=not in_place(spec)) for spec in specs}
        others = {name: a if name in self.shared else zeros(a.shape, a.dtype, commit=True)
                  for name, a in arrays.items()}
        self._bind([arrays, others], 0)

    def _bind(self, arrays: list[dict], current: int):
        """`arrays` (the memory, two sets) as OrtValues, which share it without a copy."""
        import onnxruntime as ort

        self.arrays, self.current = arrays, current
        first = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays[0].items()}
        self.buffers = [first, {name: first[name] if name in self.shared else ort.OrtValue.ortvalue_from_numpy(a)
                                for name, a in arrays[1].items()}]
        self.bindings = [None, None]   # per read set: an IOBinding with every state tensor bound

    def row(self, b: int) -> "OnnxState":
        """Row b as a batch-1 state over the same memory (every state tensor is batch-major)."""
        view = object.__new__(OnnxState)
        view.batch, view.capacity, view.q_start = 1, self.capacity, self.q_start[b:b + 1].copy()
        view.shared = self.shared
        view._bind([{name: a[b:b + 1] for name, a in arrays.items()} for arrays in self.arrays], self.current)
        return view

    def settle(self, target: int):
        """Make set `target` hold the newest state (copying the double-buffered tensors if needed)."""
        if self.current != target:
            for name, a in self.arrays[self.current].items():
                if name not in self.shared:
                    np.copyto(self.arrays[target][name], a)
            self.current = target

    def read(self):
        return self.buffers[self.current]

    def write(self):
        return self.buffers[1 - self.current]

    def swap(self):
        self.current = 1 - self.current

    def part(self, names: list[str]) -> "OnnxState":
        """The tensors `names` as a state of their own over the same memory (the joined graph's MTP
        cache, which the head run alone extends with chained drafts)."""
        view = object.__new__(OnnxState)
        view.batch, view.capacity, view.q_start = self.batch, self.capacity, self.q_start.copy()
        view.shared = self.shared
        view._bind([{name: arrays[name] for name in names} for arrays in self.arrays], self.current)
        return view

    def numpy(self, name: str) -> np.ndarray:
        """A copy of one state tensor in its artifact layout (for tests and debugging)."""
        return self.read()[name].numpy().copy()


class OnnxSession(Session):
    """`load(artifact)` for artifacts built by the onnx backend."""

    prefill_chunk = 256    # tokens a prefill step takes at most, unless QWEN35C_PREFILL_CHUNK says

    def __init__(self, directory: Path, manifest: dict, threads: int | None = None, arena: bool = True,
                 graph: str | None = None, custom_ops: str | None = None, rewrite=None):
        """`arena=False` turns off ORT's CPU memory arena (which keeps its largest working set, grown
        in doubling steps, for the session's life) and its memory patterns: slower allocation, a
        lower peak for the checks.
        `graph="mtp"` opens the artifact's MTP head (`mtp.onnx`) instead of the model, `graph="drafting"`
        the model and its head joined (`fuse.py`: each step also drafts the next token); `custom_ops` is a
        custom-op library to register (the TensorRT bundle's plugin nodes); `rewrite(ModelProto)` edits
        the graph in memory before loading (the bundle's bf16 widened to fp32; external data is read
        from the artifact as it is)."""
        import onnxruntime as ort

        from reference.config import load_config

        self.directory, self.manifest = Path(directory), manifest
        self.mode = "onnxruntime CPUExecutionProvider, fp32"
        if graph in ("mtp", "drafting") and "mtp" not in manifest["backend"]:
            raise QwenError(f"{self.directory}: this artifact has no MTP head (its checkpoint had none, or it was "
                            f"built with --no-mtp)")
        backend = manifest["backend"]["mtp"] if graph == "mtp" else manifest["backend"]
        self.graph, self.threads, self.arena = graph, threads, arena
        self.config = load_config(self.directory)
        self.tokenizer = load_tokenizer(self.directory)
        self.specs = backend["states"] + (backend["mtp"]["states"] if graph == "drafting" else [])
        knobs = settings()
        options = ort.SessionOptions()
        threads = threads or knobs.threads
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        spin = knobs.ort_spin if graph != "mtp" else False   # see draft_head
        if spin is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spin)))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = arena
        # ORT's memory pattern pre-plans one block for every intermediate of a run shape it has seen;
        # lean sessions allocate per tensor instead (measured on a 4b cpu-int4 artifact, a [3, 64]
        # batch prefill: peak 4070 -> 3806 MiB)
        options.enable_mem_pattern = arena
        options.log_severity_level = 3
        if custom_ops is not None:
            options.register_custom_ops_library(custom_ops)
        # ORT fuses DequantizeLinear(INT4) -> MatMul into MatMulNBits at accuracy level 4 (int8
        # activations) unless told otherwise; an INT4 W4A16 graph (the TensorRT bundle's) means fp32 ones
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        model = artifact_file(self.directory, manifest, backend["model"])
        source = str(model)
        if graph == "drafting" or (graph == "mtp" and knobs.draft_vocab):   # edited in memory (fuse.py)
            import onnx

            from qwen35c.backends.onnx.fuse import join_draft_head, with_draft_vocabulary

            proto = onnx.load(source, load_external_data=False)
            if graph == "drafting":
                head = onnx.load(str(artifact_file(self.directory, manifest, backend["mtp"]["model"])),
                                 load_external_data=False)
                proto = join_draft_head(proto, head, {spec["name"] for spec in backend["mtp"]["states"]},
                                        knobs.draft_vocab)
            else:   # the head alone (chained drafts) with the joined graph's draft vocabulary
                proto = with_draft_vocabulary(proto, knobs.draft_vocab)
            source = proto.SerializeToString()
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.parent))
        if rewrite is not None:
            import onnx

            source = rewrite(onnx.load(source, load_external_data=False)).SerializeToString()
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(model.parent))
            # a rewrite that widens stored tensors (bf16 -> fp32 Casts) would be folded into fp32 copies
            # of every weight, held beside the originals: cast them per step instead
            options.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        try:
            self.ort = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types
            raise QwenError(f"{model}: onnxruntime cannot load the model ({str(err).splitlines()[0][:300]})") from None
        # prepacking read every mapped initializer; those still mapped (read by a node that does not
        # prepack) need only the pages their nodes touch from now on (reference/heap.py)
        drop_mapped_pages([self.directory / name for name in manifest["files"]])
        self.vocab = self.config.vocab_size
        self.gqa = "com.microsoft::GroupQueryAttention" in backend.get("ops", {})
        if "com.microsoft::MatMulNBits" in manifest["backend"].get("ops", {}):
            self.prefill_chunk = 128   # see prefill_array
        self.extends = any(i.name == "commit" for i in self.ort.get_overridable_initializers())
        self.extra_outputs = [o.name for o in self.ort.get_outputs()   # hidden, mtp_hidden, draft
                              if o.name != "logits" and not o.name.endswith(".out")]
        self.drafts = "mtp" in backend
        self.joined = graph == "drafting"
        # the joined head drafts among the first `draft_vocab` ids (0: all of them)
        self.draft_vocab = knobs.draft_vocab if self.joined and 0 < knobs.draft_vocab < self.vocab else 0
        self._ortvalue = ort.OrtValue.ortvalue_from_numpy

    def new_state(self, batch: int, max_len: int) -> OnnxState:
        return OnnxState(self.specs, batch, max_len)

    def _run(self, ids: np.ndarray, state: OnnxState, lengths: np.ndarray, positions: np.ndarray,
             commit: np.ndarray | None = None, hidden: np.ndarray | None = None,
             following: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One step: {"logits": [B, P, V], and each extra output ("hidden" [B, T, H]...)}; `hidden`
        feeds the MTP graph's input of that name, `following` the joined graph's `next_ids`."""
        batch, length = ids.shape
        if batch != state.batch:
            raise QwenError(f"batch {batch} does not match the state's batch {state.batch}")
        need = int((state.q_start + length).max())
        if need > state.capacity:
            raise QwenError(f"the state holds {state.capacity} positions; this step needs {need}")
        binding = state.bindings[state.current]
        if binding is None:  # the state tensors are bound once per direction (A -> B, B -> A)
            binding = state.bindings[state.current] = self.ort.io_binding()
            binding.bind_output("logits", "cpu")   # first: get_outputs() follows the binding order
            for name in self.extra_outputs:
                binding.bind_output(name, "cpu")
            read, write = state.read(), state.write()
            for spec in self.specs:
                binding.bind_ortvalue_input(spec["name"], read[spec["name"]])
                binding.bind_ortvalue_output(spec["output"], write[spec["name"]])
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("q_start", state.q_start.copy())
        binding.bind_cpu_input("lengths", np.ascontiguousarray(lengths, dtype=np.int64))
        binding.bind_cpu_input("logit_positions", np.ascontiguousarray(positions, dtype=np.int64))
        if self.extends:   # an overridable initializer: bind_cpu_input looks only among the graph inputs
            binding.bind_ortvalue_input("commit", self._ortvalue(
                np.ascontiguousarray(lengths if commit is None else commit, dtype=np.int64)))
        if hidden is not None:
            binding.bind_cpu_input("hidden", np.ascontiguousarray(hidden, dtype=np.float32))
        if self.joined:
            binding.bind_cpu_input("next_ids", np.ascontiguousarray(following, dtype=np.int64))
        binding.bind_output("logits", "cpu")
        for name in self.extra_outputs:
            binding.bind_output(name, "cpu")
        with contextlib.nullcontext() if self.arena else freed_blocks_unmapped():   # lean: nor glibc's heap
            try:
                self.ort.run_with_iobinding(binding)
            except Exception as err:  # ORT raises its own exception types
                raise QwenError(f"{self.directory}: onnxruntime failed running the {self.graph or 'model'} graph "
                                f"({str(err).splitlines()[0][:300]})") from None
        outputs = binding.get_outputs()
        result = {name: outputs[i].numpy() for i, name in enumerate(["logits", *self.extra_outputs])}
        state.swap()
        state.q_start = state.q_start + (lengths if commit is None else commit).astype(np.int64)
        return result

    @staticmethod
    def _returned(out: dict[str, np.ndarray], extras: bool):
        logits = out.pop("logits")
        return (logits, out) if extras else logits

    def prefill(self, ids, state, lengths=None, last_only=False, extras=False):
        """`prefill_array` as torch tensors."""
        return _as_torch(self.prefill_array(ids, state, lengths, last_only, extras))

    def decode(self, ids, state):
        return _as_torch(self.decode_array(ids, state))

    def extend(self, ids, state, lengths, commit, extras=False):
        """`extend_array` as torch tensors."""
        return _as_torch(self.extend_array(ids, state, lengths, commit, extras))

    def prefill_array(self, ids, state, lengths=None, last_only=False, extras=False):
        """Prompts longer than `prefill_chunk` tokens (QWEN35C_PREFILL_CHUNK, else 128 for an artifact
        with quantized linears and 256 in fp32) run as consecutive chunks (the graph continues from
        q_start), which bounds the activations ORT holds at once, and so the arena it keeps for the
        session's life. 0.8b cpu-int4, 4096-token prompt, 2 threads: chunks of 1024 -> 256 took peak
        RSS 2644 -> 1371 MiB at 220 -> 230 tok/s; 256 -> 128 1432 -> 1215 MiB, prefill 218-224 ->
        227-237 tok/s (at 512 tokens 1207 -> 994 MiB, 213-240 -> 239-263 tok/s). The fp32 `cpu`
        artifact re-reads 3 GB of weights a chunk: 128 cost it 3-7% of its prefill, so it keeps 256.
        A row whose prompt ended in an earlier chunk gets length 0 in the later ones: its state is
        left as it is.
        `extras=True` returns (logits, {name: the graph's other outputs}): "hidden" [B, T, H] on an
        artifact with an MTP head; the joined graph (`drafting()`) adds "mtp_hidden" [B, T, H] and
        "draft" [B, P]."""
        ids = _int64(ids)
        batch, length = ids.shape
        lengths = np.full(batch, length, np.int64) if lengths is None else _int64(lengths)
        if lengths.shape != (batch,) or (lengths < 0).any() or (lengths > length).any():
            raise QwenError(f"lengths {lengths.tolist()} must give each of the {batch} rows 0..{length} tokens")
        chunk = settings().prefill_chunk or self.prefill_chunk
        following = _following(ids, lengths, lengths - 1) if self.joined else None
        if self.gqa and batch > 1 and length > 1 and (length > chunk or state.q_start.any()):
            out = self._rows(ids, state, lengths, last_only=last_only)
        elif length > chunk:
            out = self._prefill_chunked(ids, state, lengths, last_only, chunk, following)
        else:
            if last_only:
                positions = (lengths - 1).reshape(batch, 1)
            else:
                positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
            out = self._run(ids, state, lengths, positions, following=following)
        return self._returned(out, extras)

    def _prefill_chunked(self, ids, state, lengths, last_only, chunk, following):
        batch, length = ids.shape
        last = lengths - 1
        parts: dict[str, list] = {}
        for c0 in range(0, length, chunk):
            n = min(length, c0 + chunk) - c0
            lens = np.clip(lengths - c0, 0, n).astype(np.int64)
            if last_only:
                positions = np.clip(last - c0, 0, n - 1).reshape(batch, 1)
            else:
                positions = np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n))
            out = self._run(np.ascontiguousarray(ids[:, c0:c0 + n]), state, lens, positions,
                            following=None if following is None else following[:, c0:c0 + n])
            here = (last >= c0) & (last < c0 + n)
            for name, part in out.items():
                if last_only and name in _PER_LOGIT:   # each row's last position, from the chunk holding it
                    kept = parts.setdefault(name, [np.zeros_like(part)])[0]
                    kept[here] = part[here]
                else:
                    parts.setdefault(name, []).append(part)
        return {name: p[0] if last_only and name in _PER_LOGIT else np.concatenate(p, axis=1)
                for name, p in parts.items()}

    def _rows(self, ids, state, lengths, commit=None, last_only=False, following=None):
        """ORT's CPU GroupQueryAttention takes T > 1 on top of a non-empty cache only for batch 1
        ("batch_size must be 1 when sequence_length > 1 and past context is given"), so a batched
        continuation (a prompt on a non-empty state, a speculative step) or a batched prompt longer
        than the prefill chunk runs row by row: each row as a batch-1 state over the same buffers, a
        prompt (`commit` None) chunked as a single prompt would be. Outputs past a row's length are zero."""
        batch, length = ids.shape
        merged = {"logits": np.zeros((batch, 1 if last_only else length, self.vocab), np.float32)}
        for b, n in enumerate(lengths.tolist()):
            row = state.row(b)
            if n:
                one = np.ascontiguousarray(ids[b:b + 1, :n])
                if commit is None:   # a prompt
                    logits, out = self.prefill_array(one, row, None, last_only, extras=True)
                    out = {"logits": logits, **out}
                else:
                    out = self._run(one, row, lengths[b:b + 1], np.arange(n, dtype=np.int64)[None], commit[b:b + 1],
                                    following=None if following is None else following[b:b + 1, :n])
                for name, part in out.items():
                    if name not in merged:
                        width = 1 if last_only and name in _PER_LOGIT else length
                        merged[name] = np.zeros((batch, width, *part.shape[2:]), part.dtype)
                    merged[name][b, :part.shape[1]] = part[0]
            row.settle(1 - state.current)
        state.swap()
        state.q_start = state.q_start + (lengths if commit is None else commit)
        return merged

    def extend_array(self, ids, state, lengths, commit, extras=False):
        """ids [B, T] (right-padded to `lengths`) -> logits [B, T, V] of every step, keeping only the
        first commit[b] tokens of each row in the state (the rest, a speculative step's drafts, are
        computed and forgotten: the next step starts at q_start + commit). `extras=True`: as prefill."""
        if not self.extends:
            raise QwenError(f"{self.directory}: this artifact's graph has no commit input (built before "
                            f"speculative decoding, or with unfused GDN layers); rebuild it")
        ids = np.ascontiguousarray(_int64(ids))
        batch, length = ids.shape
        lengths, commit = _int64(lengths), _int64(commit)
        if (commit < 0).any() or (commit > lengths).any() or (lengths > length).any():
            raise QwenError(f"commit {commit.tolist()} must lie within lengths {lengths.tolist()} <= {length}")
        following = _following(ids, lengths, commit - 1) if self.joined else None
        if self.gqa and batch > 1 and length > 1:
            out = self._rows(ids, state, lengths, commit, following=following)
        else:
            positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
            out = self._run(ids, state, lengths, positions, commit, following=following)
        return self._returned(out, extras)

    def drafting(self) -> "OnnxSession":
        """This artifact's model joined with its MTP head (`fuse.py`), for speculative decoding with
        `drafter="mtp"`: a second session over the same files (the model's weights loaded again), so a
        caller that only drafts should load it directly (`load(..., drafting=True)`)."""
        if self.joined:
            return self
        if getattr(self, "_drafting", None) is None:
            self._drafting = OnnxSession(self.directory, self.manifest, self.threads, self.arena, graph="drafting")
        return self._drafting

    def draft_head(self) -> "OnnxSession":
        """The artifact's MTP head (`mtp.onnx`) as a session of its own, run by `draft_step` (one per
        session, made on first use). Its threads never spin-wait: with both pools spinning in turn on
        the same two cores, the bundled tiny model's verify steps between draft steps took ~7 ms
        instead of ~2.7 ms."""
        if not self.drafts:
            raise QwenError(f"{self.directory}: this artifact has no MTP head (its checkpoint had none, or it was "
                            f"built with --no-mtp)")
        if getattr(self, "_head", None) is None:
            self._head = OnnxSession(self.directory, self.manifest, self.threads, self.arena, graph="mtp")
        return self._head

    def draft_step(self, ids, hidden, state, q_start, lengths) -> tuple[np.ndarray, np.ndarray]:
        """The MTP graph over pairs (hidden [B, T, H] of positions q_start.., ids [B, T] the tokens
        after them), right-padded to `lengths`: (logits [B, V] of each row's last pair, its hidden
        states mtp_hidden [B, T, H]). Writes the pairs' keys and values at q_start.. of `state`."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        hidden = np.ascontiguousarray(np.asarray(hidden, dtype=np.float32))
        batch, length = ids.shape
        lengths = np.asarray(lengths, np.int64)
        state.q_start = np.asarray(q_start, np.int64).copy()
        if not (self.gqa and batch > 1 and length > 1):
            out = self._run(ids, state, lengths, np.maximum(lengths - 1, 0).reshape(batch, 1), hidden=hidden)
            return out["logits"][:, 0], out["mtp_hidden"]
        logits = np.zeros((batch, self.vocab), np.float32)    # row by row: see _rows
        states = np.zeros_like(hidden)
        for b, n in enumerate(lengths.tolist()):
            if n:
                out = self._run(ids[b:b + 1, :n], state.row(b), lengths[b:b + 1], np.asarray([[n - 1]]),
                                hidden=hidden[b:b + 1, :n])
                logits[b], states[b, :n] = out["logits"][0, 0], out["mtp_hidden"][0]
        return logits, states

    def decode_array(self, ids, state):
        ids = _int64(ids)
        batch = ids.shape[0]
        return self._run(ids.reshape(batch, 1), state, np.ones(batch, np.int64), np.zeros((batch, 1), np.int64),
                         following=np.full((batch, 1), -1) if self.joined else None)["logits"]

    def logits(self, ids):
        return self.prefill(ids, self.new_state(ids.shape[0], ids.shape[1]))


def _int64(x) -> np.ndarray:
    """ids, lengths or commit counts as int64 numpy, from numpy, lists or torch tensors."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def _as_torch(out):
    """A step's numpy result (logits, or (logits, extras)) as torch tensors over the same memory."""
    import torch

    if isinstance(out, tuple):
        logits, extras = out
        return torch.from_numpy(logits), {name: torch.from_numpy(a) for name, a in extras.items()}
    return torch.from_numpy(out)


__all__ = ["OnnxSession", "OnnxState"]
