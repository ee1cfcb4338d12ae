"""shard_experts: Rewrite each ``dsmoe::moe`` → dispatch → ``dsmoe::moe`` on the rank's experts → combine.

Given ``ctx.expert_shard`` (:class:`ExpertShard`: the process group's :class:`dsmoe.distributed.ExpertComm`
and a :class:`dsmoe.app.ep_placement.Placement`), every ``y = dsmoe::moe(x, w, ids, w13, w2, act)``
of MoE layer ``l`` becomes::

    rows, w_r, ids_r, handle = <layer>.mlp.ep_dispatch(x, w, ids)      # all_to_all_single (or nothing: allreduce)
    y_r = dsmoe::moe(rows, w_r, ids_r, w13_local, w2_local, act)       # K=1, local expert ids
    y   = <layer>.mlp.ep_combine(y_r, handle)                          # all_to_all_single back (or all_reduce)

with ``w13_local = w13[experts of this rank]`` (and ``w2_local``) as the layer's only expert
parameters: the full stacks are dropped. Not in the default pipeline (:mod:`dsmoe.passes.pipeline`):
it is a deployment step that :mod:`dsmoe.app.ep` runs on each rank after the pipeline, once the
process group exists.

Preconditions: ``outline_moe`` ran (a ``dsmoe::moe`` whose ``w13``/``w2`` are get_attr stacks of
all E experts) and shared experts are not folded in (their ids would be ≥ E: skipped, reported).
Idempotent: a ``dsmoe::moe`` fed by an ``ep_dispatch`` is passed over.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from dsmoe.contract import STACKED_W2, STACKED_W13, layer_of
from dsmoe.distributed import Combine, Dispatch
from dsmoe.ir import CAPTURE_PREFIX, module_path
from dsmoe.ops import MOE
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.graph import add_param, attr, attr_owner_path, cleanup

META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


@dataclass
class ExpertShard:
    """What :func:`shard_experts` needs: the communicator (group, rank, world, mode) and the placement."""

    comm: object  # dsmoe.distributed.ExpertComm
    placement: object  # dsmoe.app.ep_placement.Placement


def shard_experts(gm: GraphModule, ctx: PassContext) -> PassResult:
    shard: ExpertShard | None = getattr(ctx, "expert_shard", None)
    if shard is None:
        raise ValueError("shard_experts needs PassContext(expert_shard=ExpertShard(comm, placement))")
    comm, placement = shard.comm, shard.placement
    result = PassResult()
    prefix = CAPTURE_PREFIX if hasattr(gm, CAPTURE_PREFIX.rstrip(".")) else ""
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target != MOE:
            continue
        x, w13, w2 = n.args[0], n.args[3], n.args[4]
        if _is_dispatched(x):
            continue
        path = module_path(n)
        layer = layer_of(path)
        if layer not in placement.layers:
            result.skip(path, f"layer {layer} has no placement")
            continue
        if not (isinstance(w13, Node) and w13.op == "get_attr" and isinstance(w2, Node) and w2.op == "get_attr"):
            result.skip(path, "expert weights are not parameters (get_attr)")
            continue
        full13, full2 = attr(gm, w13), attr(gm, w2)
        if full13.shape[0] != placement.experts:
            result.skip(path, f"dsmoe::moe holds {full13.shape[0]} experts, the placement {placement.experts} "
                              "(shared experts folded in? shard before fold_shared_experts)")
            continue
        _rewrite(gm, n, prefix, comm, placement, layer, full13, full2, attr_owner_path(w13))
        result.rewrites += 1
    if result.rewrites:
        cleanup(gm)
    return result


def _is_dispatched(x) -> bool:
    return (isinstance(x, Node) and x.target is operator.getitem and isinstance(x.args[0], Node)
            and x.args[0].op == "call_module" and x.args[0].target.endswith(".ep_dispatch"))


def _rewrite(gm, moe: Node, prefix, comm, placement, layer, full13, full2, owner) -> None:
    x, w, ids, act = moe.args[0], moe.args[1], moe.args[2], moe.args[5]
    local = placement.local(layer, comm.rank)
    index = torch.tensor(local, dtype=torch.int64)
    w13_node = add_param(gm, owner, f"{STACKED_W13}_ep", full13.index_select(0, index).clone(), before=moe)
    w2_node = add_param(gm, owner, f"{STACKED_W2}_ep", full2.index_select(0, index).clone(), before=moe)
    mlp = owner.rsplit(".", 1)[0]  # model.layers.N.mlp
    root = gm.get_submodule(f"{prefix}{mlp}")
    root.add_module("ep_dispatch", Dispatch(comm, placement.replicas(layer)))
    root.add_module("ep_combine", Combine(comm))
    g = gm.graph
    with g.inserting_before(moe):
        d = g.call_module(f"{prefix}{mlp}.ep_dispatch", (x, w, ids))
        parts = [g.call_function(operator.getitem, (d, i)) for i in range(4)]
        local_moe = g.call_function(MOE, (parts[0], parts[1], parts[2], w13_node, w2_node, act))
        y = g.call_module(f"{prefix}{mlp}.ep_combine", (local_moe, parts[3]))
    for new in (d, *parts, local_moe, y):
        new.meta.update({k: v for k, v in moe.meta.items() if k in META_KEYS})
    y.meta["val"] = moe.meta.get("val")
    moe.replace_all_uses_with(y)
    g.erase_node(moe)
