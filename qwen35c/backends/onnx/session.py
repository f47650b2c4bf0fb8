"""The ONNX Runtime session over a built artifact: prefill / decode / generate.

State buffers are owned by the session and allocated once per `new_state(batch, max_len)`: two
sets of OrtValues (A and B) of every state tensor. A step reads one set and writes the other
through IOBinding, then they swap roles, so no state tensor is allocated per token and ORT never
reads and writes one buffer in the same step. Only the logits (a fresh [B, P, V]) are new per step.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from qwen35c.errors import QwenError
from qwen35c.runtime.session import Session, load_tokenizer

_NP = {"f32": np.float32, "f16": np.float16, "i64": np.int64}


class OnnxState:
    """Per-row token counts and the double-buffered state OrtValues."""

    def __init__(self, specs, batch: int, max_len: int):
        import onnxruntime as ort

        self.batch, self.capacity = batch, max_len
        self.q_start = np.zeros(batch, dtype=np.int64)
        sizes = {"B": batch, "S": max_len}
        self.buffers = []
        for _ in range(2):
            bufs = {}
            for spec in specs:
                shape = [sizes[d] if isinstance(d, str) else d for d in spec["shape"]]
                bufs[spec["name"]] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=_NP[spec["dtype"]]))
            self.buffers.append(bufs)
        self.current = 0

    def read(self):
        return self.buffers[self.current]

    def write(self):
        return self.buffers[1 - self.current]

    def swap(self):
        self.current = 1 - self.current

    def numpy(self, name: str) -> np.ndarray:
        """A copy of one state tensor in its artifact layout (for tests and debugging)."""
        return self.read()[name].numpy().copy()


class OnnxSession(Session):
    """`load(artifact)` for artifacts built by the onnx backend."""

    def __init__(self, directory: Path, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        from reference.config import load_config

        self.directory, self.manifest = Path(directory), manifest
        backend = manifest["backend"]
        self.config = load_config(self.directory)
        self.tokenizer = load_tokenizer(self.directory)
        self.specs = backend["states"]
        options = ort.SessionOptions()
        threads = threads or int(os.environ.get("QWEN35C_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.ort = ort.InferenceSession(str(self.directory / backend["model"]), options,
                                            providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types
            raise QwenError(f"{self.directory / backend['model']}: onnxruntime cannot load the model ({err})") from None
        self.vocab = self.config.vocab_size

    def new_state(self, batch: int, max_len: int) -> OnnxState:
        return OnnxState(self.specs, batch, max_len)

    def _run(self, ids: np.ndarray, state: OnnxState, lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
        batch, length = ids.shape
        if batch != state.batch:
            raise QwenError(f"batch {batch} does not match the state's batch {state.batch}")
        need = int((state.q_start + length).max())
        if need > state.capacity:
            raise QwenError(f"the state holds {state.capacity} positions; this step needs {need}")
        binding = self.ort.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("q_start", state.q_start.copy())
        binding.bind_cpu_input("lengths", np.ascontiguousarray(lengths, dtype=np.int64))
        binding.bind_cpu_input("logit_positions", np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_output("logits", "cpu")
        read, write = state.read(), state.write()
        for spec in self.specs:
            binding.bind_ortvalue_input(spec["name"], read[spec["name"]])
            binding.bind_ortvalue_output(spec["output"], write[spec["name"]])
        self.ort.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        state.swap()
        state.q_start = state.q_start + lengths.astype(np.int64)
        return logits

    def prefill(self, ids, state, lengths=None, last_only=False):
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        batch, length = ids.shape
        lengths = np.full(batch, length, np.int64) if lengths is None else \
            np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths, dtype=np.int64)
        if last_only:
            positions = (lengths - 1).reshape(batch, 1)
        else:
            positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        return torch.from_numpy(self._run(ids, state, lengths, positions))

    def decode(self, ids, state):
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        batch = ids.shape[0]
        return torch.from_numpy(self._run(ids.reshape(batch, 1), state, np.ones(batch, np.int64),
                                          np.zeros((batch, 1), np.int64)))

    def logits(self, ids):
        return self.prefill(ids, self.new_state(ids.shape[0], ids.shape[1]))


__all__ = ["OnnxSession", "OnnxState"]
