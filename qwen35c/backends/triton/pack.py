"""Pack the weights a plan names into one safetensors file, in each kernel's layout.

  dense linears, norms, conv, embedding, experts   bf16 (the checkpoint's values rounded once)
  A_log, dt_bias, RoPE inverse frequencies          fp32
  FP8 block-128 linears                             `#weight` float8_e4m3fn [N, K] + `#scale` fp32
                                                    [ceil(N/128), ceil(K/128)] (multiplied)
  INT4 g128 linears                                 `#qweight` u8 [N, K/2] (low nibble = even k) +
                                                    `#scales` fp32 [N, K/g] (+ `#zeros` u8)
  GDN in_proj_qkv / conv1d                          split by rows into `@q`, `@k`, `@v` parts
  routed experts (int4 / fp8 targets)               quantized here when the quantize pass left them
                                                    `not_lowered` (experts.py): `<stacked>#weight|scale`
                                                    or `#qweight|scales`, the layouts of moe/quantized.py

The packed parts come from the `weights(name)` callable exactly as the quantize pass made them (no
re-quantization). Tensors are written one at a time (reference.safetensors_io.write_safetensors:
the header first, then each tensor when its turn comes), so peak memory is one source tensor; the
same inputs give the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from qwen35c.backends.triton.plan import Plan
from qwen35c.errors import QwenError

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f8e4m3": torch.float8_e4m3fn, "u8": torch.uint8}
WEIGHTS_FILE = "weights.safetensors"


def _inv_freq(plan: Plan) -> torch.Tensor:
    from qwen35c.backends.triton.rope import naive

    return naive.inv_freq(plan.model["rope_theta"], plan.model["rotary_dim"], torch.device("cpu")).float()


def pack_weights(plan: Plan, weights: Callable[[str], torch.Tensor], out_dir: Path, *,
                 on_weight: Callable[[str], None] | None = None,
                 release: Callable[[str], None] | None = None) -> Path:
    """Write `out_dir/weights.safetensors`; `release(source)` is called after a source's last use."""
    from reference.safetensors_io import write_safetensors

    by_name = {w.name: w for w in plan.weights}
    last_use = {w.source: w.name for w in plan.weights}
    held: dict[str, torch.Tensor] = {}                  # the source being split (q/k/v parts)

    def produce(name: str) -> torch.Tensor:
        w = by_name[name]
        if w.source == "rope.inv_freq":
            tensor = _inv_freq(plan)
        elif w.quantize is not None:                    # routed experts quantized here (experts.py)
            from qwen35c.backends.triton.experts import quantize_stacked

            kind, group, which, part = w.quantize.split(":")
            key = f"{w.source}@{kind}{group}"
            if key not in held:
                held.clear()
                held[key] = quantize_stacked(weights(w.source), (kind, int(group)), which)[0]
            tensor = held[key][part]
        else:
            if w.source not in held:
                held.clear()
                try:
                    held[w.source] = weights(w.source)
                except KeyError as err:
                    raise QwenError(f"triton backend: weight {w.source} is not available ({err})") from None
            tensor = held[w.source]
            if w.reshape is not None:
                tensor = tensor.reshape(w.reshape)
            if w.rows is not None:
                tensor = tensor[w.rows[0]:w.rows[1]]
        want = DTYPES[w.dtype]
        if w.dtype in ("f8e4m3", "u8") and tensor.dtype != want:
            raise QwenError(f"triton backend: packed part {w.source} is {tensor.dtype}, the kernel needs {want}")
        tensor = tensor.to(want).contiguous()
        if list(tensor.shape) != w.shape:
            raise QwenError(f"triton backend: weight {w.source} has shape {list(tensor.shape)}, the plan needs {w.shape}")
        if on_weight is not None:
            on_weight(name)
        if last_use.get(w.source) == name:
            held.clear()
            if release is not None and w.source != "rope.inv_freq":
                release(w.source)
        return tensor

    path = Path(out_dir) / WEIGHTS_FILE
    write_safetensors(path, [(w.name, DTYPES[w.dtype], tuple(w.shape)) for w in plan.weights], produce,
                      metadata={"format": "pt", "producer": "qwen35c triton backend"})
    return path


__all__ = ["DTYPES", "WEIGHTS_FILE", "pack_weights"]
