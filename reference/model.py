"""Qwen3.5 / Qwen3-Next text model: readable eager PyTorch, faithful to HF's numerics.

Matches transformers 5.24 `models/qwen3_5/modeling_qwen3_5.py`, `qwen3_5_moe/modeling_qwen3_5_moe.py`
and `qwen3_next/modeling_qwen3_next.py` (torch fallback paths, SDPA attention, grouped_mm experts);
the MTP module follows vLLM's `qwen3_5_mtp.py`. Rounding points: notes/qwen35-architecture.md §10.

Shapes: B batch, T new tokens, H hidden, Hq/Hkv attention heads, hd head dim, Hk/Hv linear key/value
heads, dk/dv their dims, C = conv channels (2 Hk dk + Hv dv), K conv kernel, V vocabulary.

Incremental decoding keeps a `Cache`: per GDN layer a conv state [B, C, K-1] (model dtype) and a
recurrent state [B, Hv, dk, dv] (fp32); per attention layer a KV cache [B, Hkv, S_max, hd].
Batches of different lengths are right-padded and described by `lengths`; padded positions never
enter any state (beta = 0 and g = 0 there, the conv state is gathered at each row's end, and padded
keys sit beyond each row's kv length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference import ops
from reference.config import Qwen35Config


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = round(x * rsqrt(mean(x^2) + eps) * (1 + w)), all in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """GDN output norm: y = round(w * round(rmsnorm(o)) * SiLU(z)), plain weight w (init 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * y.to(x.dtype)
        return (y * F.silu(gate.float())).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Partial rotate-half RoPE tables. Text-only M-RoPE has equal t/h/w streams, i.e. plain 1-D RoPE."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        dim = config.rotary_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        # why: non-persistent fp32 buffer; .to(bf16) must not round it (HF's pitfall, notes §10)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> cos, sin [B, T, R] in the model dtype."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, hd]: rotate the first R dims (x*cos + rotate_half(x)*sin), pass the rest."""
    rotary = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


@dataclass
class Cache:
    """Decoding state for a batch. `seq_lens[b]` tokens of row b have been consumed."""

    seq_lens: Tensor                      # [B] int64
    conv: dict[int, Tensor]               # GDN layer -> [B, C, K-1] model dtype
    recurrent: dict[int, Tensor]          # GDN layer -> [B, Hv, dk, dv] fp32
    keys: dict[int, Tensor]               # attention layer -> [B, Hkv, S_max, hd]
    values: dict[int, Tensor]

    @property
    def max_len(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 1 << 62


@dataclass
class StepInfo:
    """Per-forward facts every layer needs (built once in `Qwen35Model.forward`)."""

    cos: Tensor
    sin: Tensor
    q_start: Tensor        # [B] position of the first new token of each row
    lengths: Tensor        # [B] valid new tokens per row
    valid: Tensor | None   # [B, T] bool, None when every position is valid
    cache: Cache | None
    training: bool


class GatedDeltaNet(nn.Module):
    """Linear-attention mixer: conv+SiLU on [q|k|v], beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias),
    the gated delta rule with an fp32 state, then the gated RMSNorm and out_proj."""

    def __init__(self, config: Qwen35Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.conv_dim = config.conv_dim
        hidden, value_dim = config.hidden_size, config.linear_value_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.linear_conv_kernel_dim,
                                groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, hidden, bias=False)
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)

    def forward(self, x: Tensor, step: StepInfo) -> Tensor:
        batch, length, _ = x.shape
        cache, i = step.cache, self.layer_idx
        mixed = self.in_proj_qkv(x)                                               # [B, T, C]
        z = self.in_proj_z(x).view(batch, length, self.num_v_heads, self.head_v_dim)
        b, a = self.in_proj_b(x), self.in_proj_a(x)                               # [B, T, Hv]
        conv_state = cache.conv[i] if cache else mixed.new_zeros(batch, self.conv_dim, self.conv1d.kernel_size[0] - 1)
        conv = ops.causal_conv1d_eager if step.training else ops.causal_conv1d
        mixed, conv_state = conv(mixed, self.conv1d.weight.squeeze(1), conv_state, step.lengths)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.conv_dim - 2 * self.key_dim], dim=-1)
        q = q.view(batch, length, self.num_k_heads, self.head_k_dim)
        k = k.view(batch, length, self.num_k_heads, self.head_k_dim)
        v = v.view(batch, length, self.num_v_heads, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        if step.valid is not None:  # padded steps: beta = 0 and g = 0 leave the state untouched
            beta, g = beta.masked_fill(~step.valid[..., None], 0), g.masked_fill(~step.valid[..., None], 0)
        state = cache.recurrent[i] if cache else x.new_zeros(
            batch, self.num_v_heads, self.head_k_dim, self.head_v_dim, dtype=torch.float32)
        rule = ops.gated_delta_rule_eager if step.training else ops.gated_delta_rule
        o, state = rule(q, k, v, g, beta, state)                                  # [B, T, Hv, dv]
        if cache:
            cache.conv[i], cache.recurrent[i] = conv_state, state
        o = self.norm(o, z).reshape(batch, length, -1)
        return self.out_proj(o)


class Attention(nn.Module):
    """Gated softmax attention: q_norm/k_norm per head, partial RoPE, GQA, out * sigmoid(gate), o_proj."""

    def __init__(self, config: Qwen35Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, 2 * self.num_heads * self.head_dim, bias=bias)  # per head: [q | gate]
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: Tensor, step: StepInfo) -> Tensor:
        batch, length, _ = x.shape
        q, gate = self.q_proj(x).view(batch, length, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(batch, length, -1)                                    # [B, T, Hq*hd]
        q = self.q_norm(q).transpose(1, 2)                                        # [B, Hq, T, hd]
        k = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        kv_len = step.q_start + step.lengths
        if step.cache is not None:
            k, v = self._update_cache(step.cache, k, v, step.q_start, kv_len)
        attend = ops.attention_eager if step.training else ops.attention
        out = attend(q, k, v, step.q_start, kv_len)                                # [B, Hq, T, hd]
        out = out.transpose(1, 2).reshape(batch, length, -1) * torch.sigmoid(gate)
        return self.o_proj(out)

    def _update_cache(self, cache: Cache, k: Tensor, v: Tensor, q_start: Tensor, kv_len: Tensor):
        """Write the new keys/values at each row's positions; return the used prefix of the cache."""
        keys, values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        batch, heads, length, dim = k.shape
        end = int((q_start + length).max())
        if end > keys.shape[2]:
            raise ValueError(f"KV cache holds {keys.shape[2]} positions; this step needs {end}")
        index = (q_start.view(batch, 1) + torch.arange(length, device=k.device)).view(batch, 1, length, 1)
        index = index.expand(batch, heads, length, dim)
        keys.scatter_(2, index, k.to(keys.dtype))
        values.scatter_(2, index, v.to(values.dtype))
        return keys[:, :, :end], values[:, :, :end]


class MLP(nn.Module):
    """SwiGLU: down(SiLU(gate x) * up x)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The MoE router weight [E, H] (HF name `mlp.gate.weight`); routing itself is in `ops.moe_route`."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))


class Experts(nn.Module):
    """Stacked expert weights, official fused layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))


class SparseMoeBlock(nn.Module):
    """Routed experts (softmax -> top-k -> renormalise) plus sigmoid(x W_sg) * shared_expert(x)."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        hidden = config.hidden_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Router(config.num_experts, hidden)
        self.experts = Experts(config.num_experts, hidden, config.moe_intermediate_size)
        self.shared_expert = MLP(hidden, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.router_logits: Tensor | None = None  # training only: for the load-balancing loss

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                              # [N, H]
        shared = self.shared_expert(x)
        args = (x, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj,
                self.top_k, self.norm_topk_prob)
        if self.training:
            self.router_logits = F.linear(x, self.gate.weight)
            routed = ops.moe_eager(*args)
        else:
            routed = ops.moe(*args)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return (routed + shared).view(shape)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + mixer(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: Qwen35Config, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.mlp = (SparseMoeBlock(config) if config.layer_is_moe(layer_idx)
                    else MLP(config.hidden_size, config.intermediate_size))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, x: Tensor, step: StepInfo) -> Tensor:
        x = x + self.mixer(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen35Model(nn.Module):
    """Embedding, decoder layers and the final norm (HF `model.language_model`)."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, cache: Cache | None = None, lengths: Tensor | None = None) -> Tensor:
        batch, length = input_ids.shape
        x = self.embed_tokens(input_ids)
        valid = None
        if lengths is None:
            lengths = torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
        else:
            lengths = lengths.to(device=input_ids.device, dtype=torch.long)
            valid = torch.arange(length, device=input_ids.device) < lengths.unsqueeze(1)
        q_start = cache.seq_lens if cache is not None else torch.zeros_like(lengths)
        positions = q_start.unsqueeze(1) + torch.arange(length, device=input_ids.device)
        cos, sin = self.rotary_emb(positions, x.dtype)
        step = StepInfo(cos, sin, q_start, lengths, valid, cache, self.training)
        for layer in self.layers:
            x = layer(x, step)
        if cache is not None:
            cache.seq_lens = cache.seq_lens + lengths
        return self.norm(x)


class Qwen35ForCausalLM(nn.Module):
    """The text model with its LM head (tied to the embedding when `tie_word_embeddings`)."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.model = Qwen35Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp: MTP | None = MTP(config) if config.mtp_num_hidden_layers > 0 else None

    def forward(self, input_ids: Tensor, cache: Cache | None = None, lengths: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """input_ids [B, T] -> logits [B, T, V] in the model dtype (HF does not upcast).

        `last_only` computes the head only at each row's last valid position ([B, 1, V]): a prefill
        for generation needs no more, and the head is the largest matmul of a small model."""
        hidden = self.model(input_ids, cache, lengths)
        if last_only:
            last = (lengths - 1 if lengths is not None else torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1))
            hidden = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: Tensor, cache: Cache | None = None, lengths: Tensor | None = None) -> Tensor:
        """The post-final-norm hidden states [B, T, H] (the MTP module's input)."""
        return self.model(input_ids, cache, lengths)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> Cache:
        """Zeroed decoding state for `batch` rows of up to `max_len` tokens."""
        return new_cache(self.config, self.dtype, batch, max_len, self.model.embed_tokens.weight.device)

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """HF-like random init: normal(0, std) matrices, zero-centred norms at 0, gated norm at 1,
        dt_bias 1, A_log = log(U(1, 16)). Deterministic for a seed."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            with torch.no_grad():
                leaf = name.rsplit(".", 1)[-1]
                if name.endswith("linear_attn.norm.weight") or leaf == "dt_bias":
                    param.fill_(1.0)
                elif leaf == "A_log":
                    param.copy_(torch.empty(param.shape).uniform_(1, 16, generator=generator).log())
                elif "norm" in name:  # zero-centred RMSNorms: y = x_hat * (1 + w)
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)


def new_cache(cfg: Qwen35Config, dtype: torch.dtype, batch: int, max_len: int, device="cpu") -> Cache:
    """Zeroed decoding state for `batch` rows of up to `max_len` tokens (see `Cache`)."""
    conv, recurrent, keys, values = {}, {}, {}, {}
    for i, kind in enumerate(cfg.layer_types):
        if kind == "linear_attention":
            conv[i] = torch.zeros(batch, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
            recurrent[i] = torch.zeros(batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                       cfg.linear_value_head_dim, dtype=torch.float32, device=device)
        else:
            shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
            keys[i] = torch.zeros(shape, dtype=dtype, device=device)
            values[i] = torch.zeros(shape, dtype=dtype, device=device)
    seq_lens = torch.zeros(batch, dtype=torch.long, device=device)
    return Cache(seq_lens, conv, recurrent, keys, values)


class MTP(nn.Module):
    """Multi-token prediction head (vLLM's Qwen3_5MultiTokenPredictor): predicts token i+2 from the
    hidden state at i and the embedding of token i+1, with one gated-attention decoder layer.
    Shares `embed_tokens` and `lm_head` with the main model."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(hidden, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(hidden, config.rms_norm_eps)
        # The MTP layer is always full attention; its MLP is MoE for MoE models.
        mtp_config = Qwen35Config(**{**config.__dict__, "num_hidden_layers": 1, "layer_types": ["full_attention"],
                                     "mlp_only_layers": [], "decoder_sparse_step": 1, "mtp_num_hidden_layers": 0})
        self.layers = nn.ModuleList([DecoderLayer(mtp_config, 0)])
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, hidden: Tensor, next_embeds: Tensor, positions: Tensor) -> Tensor:
        """hidden [B, T, H] (post-norm, positions i), next_embeds [B, T, H] (tokens i+1), positions [B, T]
        (i + 1) -> MTP hidden [B, T, H]; apply the shared lm_head for logits of tokens i+2."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        cos, sin = self.rotary_emb(positions, x.dtype)
        batch, length = positions.shape
        lengths = torch.full((batch,), length, dtype=torch.long, device=x.device)
        # the layer attends within this window only: key j of the window is query j's own token
        step = StepInfo(cos, sin, torch.zeros_like(lengths), lengths, None, None, self.training)
        x = self.layers[0](x, step)
        return self.norm(x)
