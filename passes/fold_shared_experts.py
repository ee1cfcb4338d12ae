"""fold_shared_experts (optional): Rewrite ``moe(x, w, ids, …) + gated_mlp(x, …)`` → one ``dsmoe::moe``.

Pattern (in a ``DeepseekMoE`` scope, after ``outline_moe`` and ``fuse_gated_mlp``): an ``add``
of the ``dsmoe::moe`` output (through dtype casts) and the shared experts' ``dsmoe::gated_mlp``,
both reading the same ``x``.

Result: the shared MLP of width ``n_shared·I`` is split into ``n_shared`` experts of width ``I``
(SwiGLU is separable per hidden unit, so the sum of the parts is the whole) and appended as
experts ``E … E+n_shared-1`` that every token selects with weight 1.0:
``moe(x, cat(w, 1), cat(ids, E+s), cat(w13, shared13), cat(w2, shared2))`` — one op per layer.

Skipped: a shared MLP whose width is not ``n_shared · moe_intermediate_size``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from dsmoe.contract import EXPERTS_ATTR, MOE_BLOCK, SHARED_ATTR
from dsmoe.functional import stack_gate_up
from dsmoe.ops import GATED_MLP, MOE
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.graph import add_param, attr, cleanup, modules_of_class, new_node, scope_nodes, strip_casts

aten = torch.ops.aten


def fold_shared_experts(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    config = ctx.config_of(gm)
    ns, I = config.n_shared_experts or 0, config.moe_intermediate_size
    for path in modules_of_class(gm, MOE_BLOCK):
        moes = [n for n in scope_nodes(gm, path) if n.target == MOE]
        shared = [n for n in scope_nodes(gm, f"{path}.{SHARED_ATTR}") if n.target == GATED_MLP]
        if len(moes) != 1 or len(shared) != 1:
            continue  # nothing to fold (already folded, or not fused yet)
        moe, mlp = moes[0], shared[0]
        add = _combine(moe, mlp)
        if add is None:
            result.skip(path, "shared output is not added to the routed output")
            continue
        if strip_casts(moe.args[0]) is not strip_casts(mlp.args[0]):
            result.skip(path, "shared and routed experts read different inputs")
            continue
        sw13, sw2 = attr(gm, mlp.args[1]), attr(gm, mlp.args[2])
        if ns < 1 or sw13.shape[0] != 2 * ns * I:
            result.skip(path, f"shared width {sw13.shape[0] // 2} is not n_shared·I = {ns}·{I}")
            continue
        x, w, ids, w13_n, w2_n, act = moe.args
        E = attr(gm, w13_n).shape[0]
        gate, up = sw13[: ns * I], sw13[ns * I:]
        s13 = torch.stack([stack_gate_up(gate[s * I:(s + 1) * I], up[s * I:(s + 1) * I]) for s in range(ns)])
        s2 = torch.stack([sw2[:, s * I:(s + 1) * I] for s in range(ns)])
        owner = f"{path}.{EXPERTS_ATTR}"
        new13 = add_param(gm, owner, "w13_with_shared", torch.cat([attr(gm, w13_n), s13]), before=moe)
        new2 = add_param(gm, owner, "w2_with_shared", torch.cat([attr(gm, w2_n), s2]), before=moe)
        id_dtype = ids.meta["val"].dtype
        sid = add_param(gm, owner, "shared_ids", torch.arange(E, E + ns, dtype=id_dtype).unsqueeze(0), before=moe)
        sw = add_param(gm, owner, "shared_weights", torch.ones(1, ns, dtype=torch.float32), before=moe)
        T = new_node(gm, aten.sym_size.int, (ids, 0), meta_from=moe)
        ids2 = new_node(gm, aten.cat.default, ([ids, new_node(gm, aten.expand.default, (sid, [T, ns]), meta_from=moe)], 1), meta_from=moe)
        w2x = new_node(gm, aten.cat.default, ([w, new_node(gm, aten.expand.default, (sw, [T, ns]), meta_from=moe)], 1), meta_from=moe)
        folded = new_node(gm, MOE, (x, w2x, ids2, new13, new2, act), meta_from=moe)
        y = folded
        if folded.meta["val"].dtype != add.meta["val"].dtype:
            y = new_node(gm, aten._to_copy.default, (folded,), {"dtype": add.meta["val"].dtype}, meta_from=add, before=add)
        add.replace_all_uses_with(y)
        gm.graph.erase_node(add)
        result.rewrites += 1
    if result.rewrites:
        cleanup(gm)
    return result


def _combine(moe: Node, mlp: Node) -> Node | None:
    """The add of (moe through casts) and the shared MLP output, if that is what joins them."""
    for add in mlp.users:
        if add.target not in (aten.add.Tensor, operator.add) or len(mlp.users) != 1:
            continue
        other = add.args[0] if add.args[1] is mlp else add.args[1]
        if strip_casts(other) is moe:
            return add
    return None
