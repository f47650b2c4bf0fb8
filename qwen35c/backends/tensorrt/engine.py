"""Stage 2 of the tensorrt backend: the engine, built where TensorRT (>= 10.15) and the bundle's GPU are.

`qwen35c.engine.build_engine` drives it (the bundle hash-checked, the output written atomically, the
engine's parity report). Here: `build_plan` registers the bundle's plugins with TensorRT's plugin
registry (`plugins.register_tensorrt`: their ahead-of-time implementations return the bundle's PTX),
parses model.onnx into a strongly typed network with one optimization profile (batch 1..8, 1..4096
new tokens, a 4096-position KV cache) and serializes the engine; `EngineSession` runs it with the ONNX
session's step logic (chunked prefill, decode, generate) over TensorRT I/O.

Where TensorRT or a GPU of the bundle's SM is missing, `EngineUnavailable` (exit code 3) says why in
one line. The project's machines have neither: this module has not been executed end to end
(`bench/gpu_tensorrt.py` is the prepared run for a machine that has both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen35c.backends.onnx.session import OnnxSession
from qwen35c.errors import QwenError

MIN_VERSION = (10, 15)      # the ONNX parser's native Attention-23 / RotaryEmbedding-23 (plugins need 10.9)
MAX_BATCH, MAX_TOKENS, MAX_CACHE = 8, 4096, 4096


class EngineUnavailable(QwenError):
    """Stage 2 cannot run on this machine (no TensorRT, too old, no GPU of the bundle's SM)."""

    exit_code = 3


def engine_blocker(sm: int | None) -> str | None:
    """Why this machine cannot build an engine for a bundle compiled for `sm`, or None."""
    from qwen35c.targets import machine_sm

    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed here (the engine needs TensorRT >= 10.15 and the bundle's GPU)"
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_VERSION:
        return f"TensorRT {trt.__version__} is older than {'.'.join(map(str, MIN_VERSION))}"
    here = machine_sm()
    if here is None:
        return "no CUDA GPU here"
    if sm is not None and here != sm:
        return f"the bundle's plugins are compiled for sm_{sm}; this GPU is sm_{here}"
    return None


def build_plan(bundle: Path, manifest: dict, say=print) -> bytes:
    """The serialized engine of a checked bundle (TensorRT imported; plugins registered first)."""
    import tensorrt as trt

    from qwen35c.backends.tensorrt.plugins import register_tensorrt

    section = manifest["backend"]
    say(f"TensorRT {trt.__version__}: registering the plugins, parsing {bundle / section['model']}")
    if section.get("plugins"):
        register_tensorrt(bundle, section)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle / section["model"])):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise QwenError(f"{bundle / section['model']}: TensorRT's ONNX parser refused it: {'; '.join(errors)[:500]}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    sizes = {"B": (1, 1, MAX_BATCH), "T": (1, 1, MAX_TOKENS), "P": (1, 1, MAX_TOKENS), "S": (1, MAX_CACHE, MAX_CACHE)}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = [_input_dims(tensor.name, d, sizes, section) for d in range(len(tensor.shape))]
        profile.set_shape(tensor.name, *[tuple(d[k] for d in dims) for k in range(3)])
    config.add_optimization_profile(profile)
    say("building the engine (strongly typed)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise QwenError(f"{bundle}: TensorRT could not build the engine (see its log above)")
    return bytes(plan)


def _input_dims(name: str, axis: int, sizes: dict, section: dict) -> tuple[int, int, int]:
    """(min, opt, max) of one input axis from the manifest's symbolic interface."""
    symbols = {"input_ids": ["B", "T"], "q_start": ["B"], "lengths": ["B"], "logit_positions": ["B", "P"]}
    for spec in section["states"]:
        symbols[spec["name"]] = spec["shape"]
    dim = symbols[name][axis]
    return sizes[dim] if isinstance(dim, str) else (dim, dim, dim)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


class EngineState:
    """The state tensors on the GPU, two sets swapped per step. The KV caches too: TensorRT's
    ScatterElements writes a whole output tensor, and an engine output must not alias an input."""

    def __init__(self, specs, batch: int, capacity: int):
        import torch

        self.batch, self.capacity = batch, capacity
        self.q_start = np.zeros(batch, dtype=np.int64)
        sizes = {"B": batch, "S": capacity}
        self.sets = [{s["name"]: torch.zeros([sizes.get(d, d) for d in s["shape"]], device="cuda") for s in specs}
                     for _ in range(2)]
        self.current = 0

    def read(self):
        return self.sets[self.current]

    def write(self):
        return self.sets[1 - self.current]

    def swap(self):
        self.current = 1 - self.current


class EngineSession(OnnxSession):
    """The ONNX session's step logic (chunked prefill, decode, generate) over a TensorRT engine."""

    def __init__(self, bundle: Path, manifest: dict, plan: bytes):     # no ONNX Runtime session
        import tensorrt as trt
        import torch

        from qwen35c.runtime.session import load_tokenizer
        from reference.config import load_config

        self.directory, self.manifest = Path(bundle), manifest
        self.mode = f"TensorRT {trt.__version__} engine, {torch.cuda.get_device_name(0)}"
        self.config, self.tokenizer = load_config(self.directory), load_tokenizer(self.directory)
        self.specs, self.vocab = manifest["backend"]["states"], self.config.vocab_size
        self.gqa, self.extends, self.extra_outputs, self.drafts = False, False, [], False
        self.threads, self.arena = None, False
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.inputs = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                       if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT}

    def new_state(self, batch, max_len):
        return EngineState(self.specs, batch, max_len)

    def _run(self, ids, state, lengths, positions, commit=None, hidden=None):
        import torch

        if commit is not None or hidden is not None:
            raise QwenError("the TensorRT bundle has no speculative or MTP inputs")
        feeds = {"input_ids": ids, "q_start": state.q_start, "lengths": lengths, "logit_positions": positions}
        tensors = {k: torch.as_tensor(np.ascontiguousarray(v, dtype=np.int64), device="cuda") for k, v in feeds.items()}
        for spec in self.specs:
            tensors[spec["name"]] = state.read()[spec["name"]]
            tensors[spec["output"]] = state.write()[spec["name"]]
        tensors["logits"] = torch.empty(ids.shape[0], positions.shape[1], self.vocab, device="cuda")
        for name, t in tensors.items():
            if name in self.inputs:
                self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise QwenError("TensorRT: execute_async_v3 failed")
        self.stream.synchronize()
        state.swap()
        state.q_start = state.q_start + np.asarray(lengths, dtype=np.int64)
        return {"logits": tensors["logits"].cpu().numpy()}


__all__ = ["EngineUnavailable", "EngineSession", "build_plan", "engine_blocker", "gpu_name"]
