"""absorb_mla: Rewrite the expanded attention of each MLA layer → one ``dsmoe::mla_attention``.

Pattern (in a ``MultiHeadLatentAttention`` scope, ``model.layers.N.self_attn``; what its
``attend`` traces to): from the latent cache ``L = [c_KV ‖ k_rope]`` (this step's tokens
appended), ``c_KV, k_rope = split(L, [R, d_rope])``, ``kv = transpose(view(linear(c_KV, kv_b_proj.weight),
[B, T, nh, d_nope + d_v]), 1, 2)``, ``k_nope, v = split(kv, [d_nope, d_v])``,
``k = cat(k_nope, expand(k_rope))``, ``q = cat(q_nope, q_rope)``,
``p = cast(softmax(cast(q @ transpose(k, 2, 3)) · scale + mask))``, and
``out = reshape(transpose(p @ v, 1, 2), [B, S, nh·d_v])`` feeding ``o_proj``.

Result: ``out = dsmoe::mla_attention(q_nope, q_rope, L, w_uk, w_uv, mask, scale)``: the
weight-absorbed form (the nope part of q multiplied into ``kv_b_proj``'s key half, the value half
applied after attention), which reads the latent cache directly instead of expanding it into
per-head keys and values at every step. ``kv_b_proj.weight [nh·(d_nope+d_v), R]`` is replaced by
two new parameters of the attention module, ``w_uk [nh, d_nope, R]`` and ``w_uv [nh, d_v, R]``
(same bytes). The cache inputs and outputs of the graph do not change: the latent is already what
is cached (:mod:`dsmoe.cache`).

Preconditions (else the layer is left alone and reported): exactly one ``kv_b_proj`` and one
``o_proj`` linear; every link of the chain above, with the split sizes, head count and view shape
of the config and the softmax over the last dim; the scale constant equal to the config's
(:func:`dsmoe.rope.softmax_scale`); keys and values from the same ``c_KV`` and ``k_rope`` split of
one latent; no bias on ``kv_b_proj``; nothing inside the region used outside it.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import GraphModule, Node

from dsmoe import rope
from dsmoe.contract import ABSORBED_W_UK, ABSORBED_W_UV, KV_B_PROJ, MLA_ATTENTION, O_PROJ
from dsmoe.ir import module_path
from dsmoe.ops import MLA_ATTENTION as MLA_OP
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.graph import (CHECKS, NoMatch, add_param, attr, erase_region, in_scope, is_call, new_node,
                                rewrite_modules, scope_nodes, strip_casts)

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def absorb_mla(gm: GraphModule, ctx: PassContext) -> PassResult:
    config = ctx.config_of(gm)
    if not config.is_mla:
        return PassResult()
    return rewrite_modules(gm, MLA_ATTENTION, MLA_OP, lambda path: _match(gm, path, config),
                           lambda path, m: _rewrite(gm, path, m, config))


def _one_linear(nodes: list[Node], path: str) -> Node:
    lin = [n for n in nodes if is_call(n, aten.linear.default) and module_path(n) == path]
    if len(lin) != 1:
        raise NoMatch(f"expected one linear in {path}, found {len(lin)}")
    return lin[0]


def _getitem_of(n: Node, i: int, target) -> Node | None:
    """The producer of ``n = getitem(target(...), i)``, else None."""
    if is_call(n, operator.getitem) and n.args[1] == i and is_call(n.args[0], target):
        return n.args[0]
    return None


def _split_sizes(split: Node) -> list[int]:
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if dim not in (-1, 3):
        raise NoMatch(f"{split.name} splits dim {dim}, not the last")
    return [int(s) for s in split.args[1]]


def _match(gm: GraphModule, path: str, c) -> dict:
    nodes = scope_nodes(gm, path)
    kv_b, o = _one_linear(nodes, f"{path}.{KV_B_PROJ}"), _one_linear(nodes, f"{path}.{O_PROJ}")
    if len(kv_b.args) > 2 and kv_b.args[2] is not None:
        raise NoMatch("kv_b_proj has a bias")
    nh, dn, dr, dv, R = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    # output: reshape(transpose(p @ v, 1, 2)) → o_proj
    out = o.args[0]
    tr = out.args[0] if out.target in VIEWS else None
    if not (is_call(tr, aten.transpose.int) and sorted(tr.args[1:3]) == [1, 2] and is_call(tr.args[0], aten.matmul.default)):
        raise NoMatch("o_proj does not read reshape(transpose(probs @ v, 1, 2))")
    pv = tr.args[0]
    sm = strip_casts(pv.args[0])
    if not (is_call(sm, aten.softmax.int) or is_call(sm, aten._softmax.default)) or sm.args[1] not in (-1, 3):
        raise NoMatch("the attention weights are not a softmax over the keys")
    add = sm.args[0]
    if not is_call(add, aten.add.Tensor):
        raise NoMatch("no additive mask before the softmax")
    scaled, mask = (add.args[0], add.args[1]) if is_call(add.args[0], aten.mul.Tensor) else (add.args[1], add.args[0])
    if not is_call(scaled, aten.mul.Tensor) or not isinstance(scaled.args[1], (int, float)):
        raise NoMatch("the scores are not multiplied by a constant scale")
    scale, want = float(scaled.args[1]), rope.softmax_scale(c.qk_head_dim, c.rope_scaling, c.max_position_embeddings)
    if not math.isclose(scale, want, rel_tol=1e-9):
        raise NoMatch(f"the graph scales scores by {scale:.6g}, the config's softmax scale is {want:.6g}")
    qk = strip_casts(scaled.args[0])
    if not is_call(qk, aten.matmul.default) or not is_call(qk.args[1], aten.transpose.int) \
            or sorted(qk.args[1].args[1:3]) != [2, 3]:
        raise NoMatch("the scores are not q @ transpose(k, 2, 3)")
    q, k = qk.args[0], qk.args[1].args[0]
    for n, what in ((q, "q"), (k, "k")):
        if not (is_call(n, aten.cat.default) and len(n.args[0]) == 2 and (len(n.args) < 2 or n.args[1] in (-1, 3))):
            raise NoMatch(f"{what} is not the concatenation of its nope and rope parts")
    q_nope, q_rope = q.args[0]
    k_nope, k_rope_x = k.args[0]
    # keys without RoPE and values: the two halves of the latent's up-projection
    split_kv = _getitem_of(k_nope, 0, aten.split_with_sizes.default)
    if split_kv is None or _getitem_of(pv.args[1], 1, aten.split_with_sizes.default) is not split_kv \
            or _split_sizes(split_kv) != [dn, dv]:
        raise NoMatch(f"keys and values are not the [{dn}, {dv}] split of one kv_b_proj output")
    tr_kv = split_kv.args[0]
    if not (is_call(tr_kv, aten.transpose.int) and sorted(tr_kv.args[1:3]) == [1, 2] and tr_kv.args[0].target in VIEWS):
        raise NoMatch("kv_b_proj's output is not viewed per head and transposed")
    view_kv = tr_kv.args[0]
    if list(view_kv.args[1][-2:]) != [nh, dn + dv] or view_kv.args[0] is not kv_b:
        raise NoMatch(f"kv_b_proj's output is not viewed as [B, T, {nh}, {dn + dv}]")
    # the latent: c_KV (kv_b_proj's input) and k_rope (expanded to every head) split from one tensor
    split_lat = _getitem_of(kv_b.args[0], 0, aten.split_with_sizes.default)
    if split_lat is None or not is_call(k_rope_x, aten.expand.default) \
            or _getitem_of(k_rope_x.args[0], 1, aten.split_with_sizes.default) is not split_lat \
            or _split_sizes(split_lat) != [R, dr]:
        raise NoMatch(f"c_KV and k_rope are not the [{R}, {dr}] split of one latent")
    latent = split_lat.args[0]
    shapes = {"q_nope": (q_nope, (nh, dn)), "q_rope": (q_rope, (nh, dr)), "latent": (latent, (1, R + dr))}
    for what, (n, (heads, dim)) in shapes.items():
        v = n.meta.get("val") if isinstance(n, Node) else None
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[1] != heads or v.shape[3] != dim:
            raise NoMatch(f"{what} is not [B, {heads}, *, {dim}]")
    region = _backward_slice(out, stop={q_nope, q_rope, latent, mask}, scope=set(nodes), path=path)
    leaks = [n.name for n in region if n is not out and any(u not in region and u.target not in CHECKS for u in n.users)]
    if leaks:
        raise NoMatch(f"values of the attention are used outside it: {leaks[:3]}")
    return dict(q_nope=q_nope, q_rope=q_rope, latent=latent, mask=mask, scale=scale, out=out, kv_b=kv_b,
                region=region)


def _backward_slice(out: Node, *, stop: set[Node], scope: set[Node], path: str) -> set[Node]:
    """The nodes computing ``out`` from ``stop`` (tensor-valued ones; shape arithmetic stays)."""
    region, frontier = set(), [out]
    while frontier:
        n = frontier.pop()
        if n in region or n in stop or n not in scope or n.op != "call_function" or not in_scope(n, path):
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor) and n.target is not operator.getitem \
                and not is_call(n, aten.split_with_sizes.default):
            continue
        region.add(n)
        frontier.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return region


def _rewrite(gm: GraphModule, path: str, m: dict, c) -> None:
    nh, dn, dv, R = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    w = attr(gm, m["kv_b"].args[1]).view(nh, dn + dv, R)
    out = m["out"]
    w_uk = add_param(gm, path, ABSORBED_W_UK, w[:, :dn].contiguous(), before=out)
    w_uv = add_param(gm, path, ABSORBED_W_UV, w[:, dn:].contiguous(), before=out)
    fused = new_node(gm, MLA_OP, (m["q_nope"], m["q_rope"], m["latent"], w_uk, w_uv, m["mask"], m["scale"]),
                     meta_from=out)
    out.replace_all_uses_with(fused)
    erase_region(gm, m["region"])
