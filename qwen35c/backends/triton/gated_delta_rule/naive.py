"""Pure-PyTorch fp32 twins of the gated delta rule kernels (same signatures, same return values).

Per value head j (key/query head j // (HV // H), repeat_interleave order) with state S [K, V]:

    S_t = exp(g_t) * S_{t-1}
    u_t = beta_t * (v_t - S_t^T k_t)
    S_t = S_t + k_t u_t^T
    o_t = scale * S_t^T q_t                       (the read uses the updated state)

`naive_recurrent_gated_delta_rule` is the token loop; `naive_chunk_gated_delta_rule` is the chunked
WY/UT form (chunk 64) and is itself tested against the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (eps inside the root, as HF and FLA)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gates(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel):
    """The activated gates in fp32: g = -exp(A_log) * softplus(a + dt_bias) from raw a; beta = sigmoid(b)."""
    g = g.float()
    beta = beta.float()
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("use_gate_in_kernel=True needs A_log [HV] (and optionally dt_bias [HV])")
        a = g if dt_bias is None else g + dt_bias.float()
        g = -torch.exp(A_log.float()) * F.softplus(a)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta)
    return g, beta


def _sequences(q, cu_seqlens):
    """[(batch row, start, end)] for each sequence: B rows of T, or the packed cu_seqlens ranges."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got {B}; flatten the batch first")
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
             use_beta_sigmoid_in_kernel):
    H, K = q.shape[2:]
    HV = v.shape[2]
    if HV % H:
        raise ValueError(f"value heads ({HV}) must be a multiple of key heads ({H})")
    q, k, v = q.float(), k.float(), v.float()
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(HV // H, dim=2)
    k = k.repeat_interleave(HV // H, dim=2)
    g, beta = gdn_gates(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel)
    scale = K ** -0.5 if scale is None else scale
    return q * scale, k, v, g, beta


def naive_recurrent_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None, use_gate_in_kernel=False, A_log=None, dt_bias=None,
    use_beta_sigmoid_in_kernel=False, inplace_final_state=True, output_step_states=False,
):
    """Token-by-token fp32 reference of `fused_recurrent_gated_delta_rule` (see there for the arguments).

    Returns (o [B, T, HV, V] in v.dtype, final_state [N, HV, K, V] fp32 or None), plus
    step_states [B, T, HV, K, V] fp32 (the state after each token) when output_step_states.
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                A_log, dt_bias, use_beta_sigmoid_in_kernel)
    B, T, HV, V = v.shape
    K = k.shape[-1]
    seqs = _sequences(q, cu_seqlens)
    o = torch.zeros(B, T, HV, V)
    steps = torch.zeros(B, T, HV, K, V) if output_step_states else None
    finals = []
    for n, (b, bos, eos) in enumerate(seqs):
        S = torch.zeros(HV, K, V) if initial_state is None else initial_state[n].float().clone()
        for t in range(bos, eos):
            S = S * torch.exp(g[b, t])[:, None, None]
            u = beta[b, t][:, None] * (v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))
            S = S + k[b, t][:, :, None] * u[:, None, :]
            o[b, t] = torch.einsum("hkv,hk->hv", S, q[b, t])
            if steps is not None:
                steps[b, t] = S
        finals.append(S)
    final = None
    if output_final_state or (initial_state is not None and inplace_final_state):
        final = torch.stack(finals) if finals else torch.zeros(0, HV, K, V)
        if initial_state is not None and inplace_final_state:
            initial_state.copy_(final)
            final = initial_state
    o = o.to(out_dtype)
    if output_step_states:
        return o, final, steps
    return o, final


def naive_chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None, use_gate_in_kernel=False, A_log=None, dt_bias=None,
    use_beta_sigmoid_in_kernel=False,
):
    """Chunked (WY/UT, chunk 64) fp32 reference of `chunk_gated_delta_rule` (see there for the arguments).

    Per chunk, with gamma the chunk-local cumsum of g and Gamma_rs = exp(gamma_r - gamma_s) (s <= r):
      L = strict_lower(beta_r (k_r . k_s) Gamma_rs),  T = (I + L)^-1
      U = T (beta * V),  W = T (beta * exp(gamma) * K)           (WY representation)
      V' = U - W S,  O = (Q * exp(gamma)) S + ((Q K^T) * Gamma) V',  S <- exp(gamma_C) S + (K * exp(gamma_C - gamma))^T V'
    Returns (o [B, T, HV, V] in v.dtype, final_state [N, HV, K, V] fp32 or None).
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel,
                                A_log, dt_bias, use_beta_sigmoid_in_kernel)
    B, T, HV, V = v.shape
    K = k.shape[-1]
    C = CHUNK_SIZE
    o = torch.zeros(B, T, HV, V)
    finals = []
    for n, (b, bos, eos) in enumerate(_sequences(q, cu_seqlens)):
        S = torch.zeros(HV, K, V) if initial_state is None else initial_state[n].float().clone()
        for c0 in range(bos, eos, C):
            c1 = min(c0 + C, eos)
            # [HV, L, *] head-major views of this chunk
            qc, kc, vc = (x[b, c0:c1].transpose(0, 1) for x in (q, k, v))
            gc, bc = g[b, c0:c1].transpose(0, 1), beta[b, c0:c1].transpose(0, 1)
            L = c1 - c0
            gamma = gc.cumsum(-1)                                            # [HV, L]
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            diff = (gamma[:, :, None] - gamma[:, None, :]).masked_fill(~causal, float("-inf"))
            Gamma = diff.exp()                                               # [HV, L, L], 0 above diag
            Lmat = (bc[:, :, None] * (kc @ kc.transpose(1, 2)) * Gamma).tril(-1)
            eye = torch.eye(L).expand(HV, L, L)
            U = torch.linalg.solve_triangular(eye + Lmat, bc[..., None] * vc, upper=False, unitriangular=True)
            W = torch.linalg.solve_triangular(eye + Lmat, (bc * gamma.exp())[..., None] * kc, upper=False,
                                              unitriangular=True)
            Vn = U - W @ S                                                   # [HV, L, V]
            oc = (qc * gamma.exp()[..., None]) @ S + ((qc @ kc.transpose(1, 2)) * Gamma) @ Vn
            o[b, c0:c1] = oc.transpose(0, 1)
            last = gamma[:, -1]
            S = last.exp()[:, None, None] * S + (kc * (last[:, None] - gamma).exp()[..., None]).transpose(1, 2) @ Vn
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(out_dtype), final
