"""The fused ops of the IR: ``dsmoe::route``, ``dsmoe::moe``, ``dsmoe::gated_mlp``, ``dsmoe::mla_attention``.

Each is a ``torch.library.custom_op`` with a fake (shape) function and a CPU implementation that
is a real backend (one matmul pair per *hit* expert, tokens grouped by expert once). CUDA
implementations slot in per device from ``dsmoe.plugins`` (``register_kernel("cuda")``).
The op object (``torch.ops.dsmoe.moe.default``) is the single alias used as FX target, ONNX
lowering key and TensorRT plugin key.

Shape letters: T tokens, H hidden, E routed experts, K experts per token, I expert width; for
attention B batch, S new tokens, L cached + new tokens, nh heads, R ``kv_lora_rank``.
Weights stay in the model dtype; routing math and accumulation are fp32 (attention: scores and
softmax in fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsmoe import functional, routing


@torch.library.custom_op("dsmoe::route", mutates_args=())
def route(
    x: Tensor,
    w_gate: Tensor,
    bias: Tensor | None,
    scoring: str,
    topk_method: str,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
    scale_when: str,
) -> tuple[Tensor, Tensor]:
    """``x [T,H], w_gate [E,H], bias [E]?`` → ``(weights [T,K] fp32, ids [T,K] int32)``.

    Every DeepSeek routing variant (see :func:`dsmoe.routing.route` for the order of operations).
    """
    return route_reference(x, w_gate, bias, scoring, topk_method, top_k, n_group, topk_group, norm_topk_prob,
                           scaling, scale_when)


def route_reference(x, w_gate, bias, scoring, topk_method, top_k, n_group, topk_group, norm_topk_prob, scaling,
                    scale_when):
    """The default implementation of ``dsmoe::route`` (torch ops, any device; positional, as
    graph nodes call it)."""
    weights, ids = routing.route(
        x, w_gate, bias, scoring=scoring, topk_method=topk_method, top_k=top_k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=norm_topk_prob, scaling=scaling, scale_when=scale_when,
    )
    return weights.contiguous(), ids.contiguous()


@route.register_fake
def _(x, w_gate, bias, scoring, topk_method, top_k, n_group, topk_group, norm_topk_prob, scaling, scale_when):
    T = x.shape[0]
    return x.new_empty((T, top_k), dtype=torch.float32), x.new_empty((T, top_k), dtype=torch.int32)


@torch.library.custom_op("dsmoe::moe", mutates_args=())
def moe(x: Tensor, weights: Tensor, ids: Tensor, w13: Tensor, w2: Tensor, activation: str) -> Tensor:
    """``y[t] = Σ_k weights[t,k] · w2[e]·(act(w13[e][:I]·x[t]) ⊙ w13[e][I:]·x[t])``, ``e = ids[t,k]``.

    ``x [T,H], weights [T,K] fp32, ids [T,K] int, w13 [E,2I,H] (gate rows, then up rows),
    w2 [E,H,I]`` → ``y [T,H]`` in x's dtype. Ids outside ``[0,E)`` are an error.
    """
    return moe_reference(x, weights, ids, w13, w2, activation)


@moe.register_fake
def _(x, weights, ids, w13, w2, activation):
    return torch.empty_like(x)


@torch.library.custom_op("dsmoe::gated_mlp", mutates_args=())
def gated_mlp(x: Tensor, w13: Tensor, w2: Tensor, activation: str) -> Tensor:
    """``y = w2·(act(w13[:I]·x) ⊙ w13[I:]·x)`` with ``x [T,H], w13 [2I,H], w2 [H,I]`` → ``y [T,H]``."""
    return functional.gated_mlp(x, w13, w2, activation)


@gated_mlp.register_fake
def _(x, w13, w2, activation):
    return x.new_empty((*x.shape[:-1], w2.shape[0]))


def moe_reference(x, weights, ids, w13, w2, activation):
    """The default implementation of ``dsmoe::moe`` (torch ops, any device; one host sync for the
    per-expert counts). Grouped reference kernel: sort the T·K (token, slot) pairs by expert once, then one
    gate/up matmul and one down matmul per expert that received tokens; combine in fp32."""
    T, H = x.shape
    K = ids.shape[1]
    E = w13.shape[0]
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= E):
        raise ValueError(f"dsmoe::moe: expert ids must lie in [0, {E}), got [{int(flat.min())}, {int(flat.max())}]")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    tok = order // K
    xs = x.index_select(0, tok)  # [T·K, H], grouped by expert
    ws = weights.reshape(-1).float().index_select(0, order).unsqueeze(-1)
    out = torch.empty((T * K, H), dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        out[sl] = functional.gated_mlp(xs[sl], w13[e], w2[e], activation).float() * ws[sl]
        start += c
    y = torch.zeros((T, H), dtype=torch.float32, device=x.device).index_add_(0, tok, out)
    return y.to(x.dtype)


@torch.library.custom_op("dsmoe::mla_attention", mutates_args=())
def mla_attention(q_nope: Tensor, q_rope: Tensor, latent: Tensor, w_uk: Tensor, w_uv: Tensor, mask: Tensor,
                  scale: float) -> Tensor:
    """Multi-head Latent Attention over the compressed cache, weights absorbed.

    ``q_nope [B,nh,S,d_nope]``, ``q_rope [B,nh,S,d_rope]`` (RoPE applied), ``latent [B,1,L,R+d_rope]``
    (the cache with this step's tokens: ``[c_KV ‖ k_rope]``, :mod:`dsmoe.cache`), ``w_uk [nh,d_nope,R]``
    and ``w_uv [nh,d_v,R]`` (``kv_b_proj.weight`` viewed ``[nh, d_nope + d_v, R]``, split), ``mask
    [B,1,S,L]`` fp32 additive → ``y [B, S, nh·d_v]`` in q's dtype::

        y[b,s,h] = w_uv[h] · Σ_l p[b,h,s,l] · c_KV[b,l]
        p = softmax(scale · (q_nope[b,h,s]·w_uk[h]·c_KV[b,l] + q_rope[b,h,s]·k_rope[b,l]) + mask)

    which equals attention with keys ``[w_uk[h]·c_KV ‖ k_rope]`` and values ``w_uv[h]·c_KV``
    (the expanded form). The CPU kernel takes whichever form costs fewer FLOPs
    (:func:`mla_absorbed_is_cheaper`): absorbed for decode, expanded for a prefill from an empty cache.
    """
    return mla_attention_reference(q_nope, q_rope, latent, w_uk, w_uv, mask, scale)


@mla_attention.register_fake
def _(q_nope, q_rope, latent, w_uk, w_uv, mask, scale):
    B, nh, S, _ = q_nope.shape
    return q_nope.new_empty((B, S, nh * w_uv.shape[1]))


def mla_absorbed_is_cheaper(S: int, L: int, nh: int, d_nope: int, d_rope: int, d_v: int, R: int) -> bool:
    """Multiply-adds of the two forms for S queries over L cached tokens: absorbed ``nh·S·(R·(d_nope
    + d_v) + L·(2R + d_rope))`` vs expanded ``nh·L·R·(d_nope + d_v) + nh·S·L·(d_nope + d_rope + d_v)``."""
    absorbed = nh * S * (R * (d_nope + d_v) + L * (2 * R + d_rope))
    expanded = nh * L * R * (d_nope + d_v) + nh * S * L * (d_nope + d_rope + d_v)
    return absorbed <= expanded


def mla_attention_reference(q_nope, q_rope, latent, w_uk, w_uv, mask, scale, form: str = "auto"):
    """The CPU implementation of ``dsmoe::mla_attention``: ``form`` ``"absorbed"``, ``"expanded"``
    or ``"auto"`` (fewer FLOPs, :func:`mla_absorbed_is_cheaper`)."""
    B, nh, S, dn = q_nope.shape
    L, R, dv = latent.shape[2], w_uk.shape[2], w_uv.shape[1]
    if form == "auto":
        form = "absorbed" if mla_absorbed_is_cheaper(S, L, nh, dn, q_rope.shape[-1], dv, R) else "expanded"
    if form == "absorbed":
        return mla_absorbed(q_nope, q_rope, latent, w_uk, w_uv, mask, scale)
    c_kv, k_rope = latent[..., :R], latent[..., R:]
    k = torch.cat([torch.matmul(c_kv, w_uk.transpose(1, 2)), k_rope.expand(B, nh, L, k_rope.shape[-1])], dim=-1)
    v = torch.matmul(c_kv, w_uv.transpose(1, 2))  # [B,nh,L,dv]
    scores = torch.matmul(torch.cat([q_nope, q_rope], dim=-1), k.transpose(2, 3)).float() * scale
    probs = torch.softmax(scores + mask, dim=-1).to(q_nope.dtype)
    return torch.matmul(probs, v).transpose(1, 2).reshape(B, S, nh * dv)


def mla_absorbed(q_nope, q_rope, latent, w_uk, w_uv, mask, scale):
    """The absorbed form in plain torch ops (the CPU path for decode, and the ONNX lowering): the
    heads fold into the query rows, so scores and the weighted sum are one batched matmul each
    against the single-head latent (``[B, nh·S, R+d_rope] @ [B, R+d_rope, L]``), never a per-head
    copy of the cache."""
    B, nh, S, _ = q_nope.shape
    L, R, dv = latent.shape[2], w_uk.shape[2], w_uv.shape[1]
    q_lat = torch.matmul(q_nope, w_uk)  # [B,nh,S,R]: the nope part of q, into the latent space
    q = torch.cat([q_lat, q_rope], dim=-1).reshape(B, nh * S, -1)
    lat = latent.reshape(B, L, -1)
    scores = torch.matmul(q, lat.transpose(1, 2)).view(B, nh, S, L).float() * scale
    probs = torch.softmax(scores + mask, dim=-1).to(q_nope.dtype)
    o_lat = torch.matmul(probs.reshape(B, nh * S, L), lat[..., :R]).view(B, nh, S, R)
    out = torch.matmul(o_lat, w_uv.transpose(1, 2))  # [B,nh,S,dv]: the value half, after attention
    return out.transpose(1, 2).reshape(B, S, nh * dv)


ROUTE = torch.ops.dsmoe.route.default
MOE = torch.ops.dsmoe.moe.default
GATED_MLP = torch.ops.dsmoe.gated_mlp.default
MLA_ATTENTION = torch.ops.dsmoe.mla_attention.default
FUSED_OPS = {ROUTE: "dsmoe::route", MOE: "dsmoe::moe", GATED_MLP: "dsmoe::gated_mlp", MLA_ATTENTION: "dsmoe::mla_attention"}
