"""The reference model run one decoder layer at a time (bounded memory, same numbers).

`StreamedModel(path)` computes exactly what `load_model(path)(...)` computes — the same modules, the
same weights in the same dtype, the same per-batch tensors, so its logits are bit-for-bit equal —
while only the embedding, the final norm, the LM head (one copy when tied) and the current decoder
layer are resident. A layer's tensors are read from the memory-mapped checkpoint, copied into the
layer, their mapped pages released, and the layer is dropped once every batch went through it.

One call runs a whole prompt SET (`forward_many`, or `forward_each` to take the logits a batch at a
time): every batch's activations [B, T, H] are held while the layers stream past, so a prompt set
costs one pass over the weights. Incremental decoding works too (a `Cache` per batch, `new_cache`);
each decode step is one pass.

`layer_hook(index, layer) -> module` transforms a freshly loaded layer before it runs (the
quantization-emulating reference replaces linears with their dequantized twins there);
`head_hook(lm_head) -> module` sees the head before its weight is loaded (on the meta device):
returned unchanged, the checkpoint's weight is loaded into it; another module replaces it, and
nothing is loaded. `embed_hook(table) -> table` gives the lookup table or a lookup (ids -> rows) (it
is passed the fp32 table when a tied fp32 head holds it, else None: the lookups otherwise gather
checkpoint rows). Sequential
quantization drives `load_layer`, `step_info` and `embed` itself. Memory: one layer in `dtype` + activations + edges; see `layer_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.checkpoint import Checkpoint, WeightLoader, quantization_method, reconcile_config
from reference.config import load_config
from reference.errors import CheckpointError
from reference.heap import return_freed_memory
from reference.model import Cache, DecoderLayer, RMSNorm, RotaryEmbedding, StepInfo, new_cache

__all__ = ["StreamedModel", "Batch", "layer_bytes", "return_freed_memory"]

LayerHook = Callable[[int, nn.Module], nn.Module]


@dataclass
class Batch:
    """One forward of the prompt set: ids [B, T], optional cache (advanced) and lengths [B]."""

    ids: Tensor
    cache: Cache | None = None
    lengths: Tensor | None = None
    last_only: bool = False


class StreamedModel:
    """`Qwen35ForCausalLM` semantics with one decoder layer resident (see the module docstring)."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32,
                 layer_hook: LayerHook | None = None, head_hook: Callable[[nn.Module], nn.Module] | None = None,
                 embed_hook: Callable[[Tensor], Tensor] | None = None):
        self.directory = Path(path)
        method = quantization_method(self.directory)
        if method is not None:
            raise CheckpointError(f"{self.directory / 'config.json'}: a quantized checkpoint (quant_method="
                                  f"'{method}'); the streamed reference takes full-precision weights only")
        self.config = load_config(self.directory)
        self.ckpt = Checkpoint(self.directory)
        self.load_notes = reconcile_config(self.config, self.ckpt)
        self.loader = WeightLoader(self.ckpt, self.config)
        self.dtype, self.layer_hook, self.head_hook, self.embed_hook = dtype, layer_hook, head_hook, embed_hook
        self.rotary = RotaryEmbedding(self.config)
        self._edges: tuple[Tensor, nn.Module, nn.Module] | None = None   # embedding, final norm, head
        self.training = False

    # ---- weights ----------------------------------------------------------------------------
    def _load(self, name: str, shape) -> Tensor:
        value = self.loader.tensor(name, shape).to(dtype=self.dtype, copy=True)
        self.loader.release(name)
        return value

    def load_layer(self, index: int) -> DecoderLayer:
        """Decoder layer `index` with its weights copied from the checkpoint (pages released)."""
        if not 0 <= index < self.config.num_hidden_layers:
            raise CheckpointError(f"{self.directory}: no decoder layer {index} "
                                  f"(the config has {self.config.num_hidden_layers})")
        with torch.device("meta"):
            layer = DecoderLayer(self.config, index)
        prefix = f"model.layers.{index}."
        for name, param in list(layer.named_parameters()):
            owner_name, _, leaf = name.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            value = self._load(prefix + name, param.shape)
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        return layer.eval()

    def edges(self) -> tuple[Tensor | None, nn.Module, nn.Module]:
        """(embedding [V, H], final norm, LM head): loaded once, kept; a tied head shares the embedding.
        The embedding is None when nothing needs it whole: the lookups then gather their rows from the
        mapped checkpoint (`embed`; an untied model, or a tied one whose head the head hook replaced)."""
        if self._edges is None:
            cfg = self.config
            embed, norm = None, self.final_norm()
            with torch.device("meta"):
                head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            replaced = self.head_hook(head) if self.head_hook is not None else head
            if replaced is not head:                  # a replaced head: its table is not loaded at all
                head = replaced
            elif cfg.tie_word_embeddings:
                embed = self._load("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
                head.weight = nn.Parameter(embed, requires_grad=False)
            else:
                head.weight = nn.Parameter(self._load("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)),
                                           requires_grad=False)
            if self.embed_hook is not None:          # after the head's: a shared table may come from it
                embed = self.embed_hook(embed)
            self._edges = (embed, norm, head)
        return self._edges

    def load_mtp(self) -> nn.Module:
        """The MTP head (`reference.model.MTP`) with its `mtp.*` weights; it shares `embed` and the
        LM head of `edges()` with the model, as in `Qwen35ForCausalLM`."""
        from reference.model import MTP

        if not self.config.mtp_num_hidden_layers:
            raise CheckpointError(f"{self.directory}: the model has no MTP head")
        with torch.device("meta"):
            mtp = MTP(self.config)
        for name, param in list(mtp.named_parameters()):
            owner_name, _, leaf = name.rpartition(".")
            setattr(mtp.get_submodule(owner_name), leaf,
                    nn.Parameter(self._load("mtp." + name, param.shape), requires_grad=False))
        mtp.rotary_emb = RotaryEmbedding(self.config)     # its inv_freq buffer was made on the meta device
        return mtp.eval()

    def final_norm(self) -> RMSNorm:
        cfg = self.config
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        norm.weight = nn.Parameter(self._load("model.norm.weight", (cfg.hidden_size,)), requires_grad=False)
        return norm

    def head_source(self) -> tuple[str, Tensor]:
        """(parameter name, the LM head's weight [V, H] as stored: a view of the mapped checkpoint,
        in its dtype; `loader.release(name)` drops its pages). A tied head is the embedding."""
        cfg = self.config
        name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return name, self.loader.tensor(name, (cfg.vocab_size, cfg.hidden_size))

    def close(self) -> None:
        self._edges = None
        self.ckpt.close()

    # ---- running ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> Cache:
        return new_cache(self.config, self.dtype, batch, max_len)

    def step_info(self, batch: Batch) -> StepInfo:
        """The per-forward facts of `Qwen35Model.forward` for one batch."""
        ids, cache = batch.ids, batch.cache
        rows, length = ids.shape
        valid = None
        if batch.lengths is None:
            lengths = torch.full((rows,), length, dtype=torch.long)
        else:
            lengths = batch.lengths.to(dtype=torch.long)
            valid = torch.arange(length) < lengths.unsqueeze(1)
        q_start = cache.seq_lens if cache is not None else torch.zeros_like(lengths)
        positions = q_start.unsqueeze(1) + torch.arange(length)
        cos, sin = self.rotary(positions, self.dtype)
        return StepInfo(cos, sin, q_start, lengths, valid, cache, False)

    def embed(self, ids: Tensor) -> Tensor:
        """ids [B, T] -> [B, T, H]. Unless the edges hold the table, the rows are gathered from the
        mapped checkpoint and converted (exact: a gather commutes with an elementwise cast)."""
        table = self.edges()[0] if self._edges is not None or self.embed_hook is not None else None
        if callable(table):                           # the embed hook's lookup
            return table(ids)
        if table is not None:
            return F.embedding(ids, table)
        name, cfg = "model.embed_tokens.weight", self.config
        rows = F.embedding(ids, self.loader.tensor(name, (cfg.vocab_size, cfg.hidden_size))).to(self.dtype)
        self.loader.release(name)
        return rows

    @torch.no_grad()
    def run_layers(self, xs: list[Tensor], steps: list[StepInfo]) -> list[Tensor]:
        """Every decoder layer over every batch's activations xs[b] [B, T, H], one layer resident."""
        for index in range(self.config.num_hidden_layers):
            layer = self.load_layer(index)
            if self.layer_hook is not None:
                layer = self.layer_hook(index, layer)
            xs = [layer(x, step) for x, step in zip(xs, steps)]
            del layer
            return_freed_memory()
        return xs

    def forward_many(self, batches: list[Batch]) -> list[Tensor]:
        """Logits of every batch ([B, T, V], or [B, 1, V] with `last_only`) in one pass over the layers."""
        return list(self.forward_each(batches))

    @torch.no_grad()
    def forward_each(self, batches: list[Batch]) -> Iterator[Tensor]:
        """`forward_many`, yielding each batch's logits in turn: the layers run over every batch before
        the first is yielded, and only the batch being consumed has its [B, T, V] logits in memory
        (a 248K vocabulary: ~1 MB a position)."""
        steps = [self.step_info(b) for b in batches]
        xs = self.run_layers([self.embed(b.ids) for b in batches], steps)
        _, norm, head = self.edges()
        for index, (batch, step) in enumerate(zip(batches, steps)):
            x, xs[index] = xs[index], None
            if batch.cache is not None:
                batch.cache.seq_lens = batch.cache.seq_lens + step.lengths
            hidden = norm(x)
            if batch.last_only:
                last = step.lengths - 1
                hidden = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))
            yield head(hidden)

    def forward(self, input_ids: Tensor, cache: Cache | None = None, lengths: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """Same signature and result as `Qwen35ForCausalLM.forward` (one batch, one pass)."""
        return self.forward_many([Batch(input_ids, cache, lengths, last_only)])[0]

    __call__ = forward

    def eval(self) -> "StreamedModel":
        return self


def layer_bytes(config, dtype: torch.dtype = torch.float32) -> list[int]:
    """Bytes of each decoder layer's parameters in `dtype` (shapes only; nothing is read)."""
    sizes = []
    for index in range(config.num_hidden_layers):
        with torch.device("meta"):
            layer = DecoderLayer(config, index)
        sizes.append(sum(p.numel() for p in layer.parameters()) * dtype.itemsize)
    return sizes
