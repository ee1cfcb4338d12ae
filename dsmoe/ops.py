"""The fused ops of the IR: ``dsmoe::route``, ``dsmoe::moe``, ``dsmoe::gated_mlp``.

Each is a ``torch.library.custom_op`` with a fake (shape) function and a CPU implementation that
is a real backend (one matmul pair per *hit* expert, tokens grouped by expert once). CUDA
implementations slot in per device from ``dsmoe.plugins`` (``register_kernel("cuda")``).
The op object (``torch.ops.dsmoe.moe.default``) is the single alias used as FX target, ONNX
lowering key and TensorRT plugin key.

Shape letters: T tokens, H hidden, E routed experts, K experts per token, I expert width.
Weights stay in the model dtype; routing math and accumulation are fp32.
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


ROUTE = torch.ops.dsmoe.route.default
MOE = torch.ops.dsmoe.moe.default
GATED_MLP = torch.ops.dsmoe.gated_mlp.default
FUSED_OPS = {ROUTE: "dsmoe::route", MOE: "dsmoe::moe", GATED_MLP: "dsmoe::gated_mlp"}
