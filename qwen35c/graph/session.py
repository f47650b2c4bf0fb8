"""Running a stateful step graph (the output of `insert-state`) like a decoding session.

`GraphSession(graph, weights, batch, max_len)` holds every state tensor (zeros at first, typed by
the graph's state inputs with `B = batch` and cache capacity `S = max_len`) and the per-row token
counts; `step(input_ids, lengths)` runs one prefill or decode step through the interpreter and
keeps the new states. This is how the stateful graph is checked against the reference model.
"""

from __future__ import annotations

import torch

from qwen35c.graph.interpreter import WeightFn, run
from qwen35c.graph.ir import Graph
from qwen35c.graph.ops import resolve_shape


class GraphSession:
    def __init__(self, graph: Graph, weights: WeightFn, batch: int, max_len: int):
        pairs = graph.state_pairs()
        if not pairs:
            raise ValueError(f"graph @{graph.name} has no state inputs; run insert-state first")
        self.graph, self.weights = graph, weights
        sizes = {"B": batch, "S": max_len}
        self.state = {value.name: torch.zeros(resolve_shape(value.type.shape, sizes),
                                              dtype=value.type.torch_dtype)
                      for _key, value, _out in pairs}
        self._out_of = {value.name: out.name for _key, value, out in pairs}
        self.seq_lens = torch.zeros(batch, dtype=torch.long)

    def step(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (right-padded), lengths [B] valid tokens per row -> logits [B, T, V]."""
        batch, length = input_ids.shape
        if lengths is None:
            lengths = torch.full((batch,), length, dtype=torch.long)
        inputs = {"input_ids": input_ids, "q_start": self.seq_lens.clone(), "lengths": lengths, **self.state}
        if any(v.name == "commit" for v in self.graph.inputs):
            inputs["commit"] = lengths
        out = run(self.graph, inputs, self.weights)
        for name, out_name in self._out_of.items():
            self.state[name] = out[out_name]
        self.seq_lens = self.seq_lens + lengths
        return out[self.graph.outputs[0].name]


__all__ = ["GraphSession"]
