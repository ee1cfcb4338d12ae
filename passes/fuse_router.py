"""fuse_router: Rewrite each MoE router subgraph → one ``dsmoe::route``.

Pattern (the nodes of one ``MoEGate`` scope, ``model.layers.N.mlp.gate``):
``linear(x, gate.weight)`` in fp32 → softmax | sigmoid → (+ e_score_correction_bias) →
(group scores → top groups → mask) → topk → gather → (normalize) → (scale), producing
``ids [T,K] int64`` and ``weights [T,K] fp32``.

Result: ``weights, ids = dsmoe::route(x, gate.weight, bias?, **routing)`` with ``ids`` int32;
the old int64 users get an ``aten._to_copy`` (dead once ``outline_moe`` consumes the int32 ids).

Preconditions checked per region (else it is left alone and reported): exactly one ``linear``
whose weight is the gate's, the scoring op the config names, a ``topk`` with k = top_k, and exactly
two values leaving the region (one integer, one floating). The routing attributes come from the
model config (:attr:`DeepseekConfig.routing`) and are cross-checked against the graph.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from dsmoe.ops import ROUTE
from dsmoe.passes._graph import (CASTS, CHECKS, attr_owner_path, cleanup, erase_region, is_call, is_tensor_valued,
                                 modules_of_class, new_node, scope_nodes, strip_casts)
from dsmoe.passes.context import PassContext, PassResult

aten = torch.ops.aten
SCORING_OPS = {"softmax": {aten.softmax.int, aten._softmax.default}, "sigmoid": {aten.sigmoid.default}}


def fuse_router(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    spec = ctx.config_of(gm).routing
    for path in modules_of_class(gm, "MoEGate"):
        region = _region(gm, path)
        if any(n.target == ROUTE for n in region):
            continue  # already fused (idempotence)
        linears = [n for n in region if is_call(n, aten.linear.default)]
        w_gate = strip_casts(linears[0].args[1]) if len(linears) == 1 else None
        if w_gate is None or w_gate.op != "get_attr" or attr_owner_path(w_gate) != path:
            result.skip(path, f"expected one linear on {path}.weight, found {len(linears)}")
            continue
        if not any(n.target in SCORING_OPS[spec.scoring] for n in region):
            result.skip(path, f"no {spec.scoring} scoring op (config scoring_func={spec.scoring!r})")
            continue
        topks = [n for n in region if is_call(n, aten.topk.default)]
        if not topks or topks[-1].args[1] != spec.top_k:
            result.skip(path, f"final topk k={topks[-1].args[1] if topks else None} != top_k {spec.top_k}")
            continue
        outputs = [n for n in region if any(u not in region for u in n.users)]
        ints = [n for n in outputs if _is_int(n)]
        floats = [n for n in outputs if not _is_int(n)]
        if len(ints) != 1 or len(floats) != 1:
            result.skip(path, f"expected one ids and one weights output, found {[n.name for n in outputs]}")
            continue
        # region inputs: the hidden states (the linear's input, traced back through dtype casts),
        # the gate weight and the optional correction bias
        x = strip_casts(linears[0].args[0])
        inputs = {strip_casts(a) for n in region for a in n.all_input_nodes}
        bias = [a for a in inputs if a.op == "get_attr" and a.target.endswith("e_score_correction_bias")]
        if (spec.topk_method == "noaux_tc") != bool(bias):
            result.skip(path, "correction bias presence does not match topk_method")
            continue
        ids_out, w_out = ints[0], floats[0]
        route = new_node(gm, ROUTE, (x, w_gate, bias[0] if bias else None, spec.scoring,
                                     spec.topk_method, spec.top_k, spec.n_group, spec.topk_group,
                                     spec.norm_topk_prob, spec.scaling, spec.scale_when),
                         meta_from=w_out, before=region[0])
        weights = new_node(gm, operator.getitem, (route, 0), meta_from=w_out, before=region[0])
        ids32 = new_node(gm, operator.getitem, (route, 1), meta_from=ids_out, before=region[0])
        ids64 = new_node(gm, aten._to_copy.default, (ids32,), {"dtype": ids_out.meta["val"].dtype},
                         meta_from=ids_out, before=region[0])
        ids_out.replace_all_uses_with(ids64, delete_user_cb=lambda u: u not in region)
        w_out.replace_all_uses_with(weights, delete_user_cb=lambda u: u not in region)
        erase_region(gm, region)
        result.rewrites += 1
    if result.rewrites:
        cleanup(gm)
    return result


def _region(gm, path):
    """The gate's tensor-valued nodes and checks, minus casts (and checks) of values coming from
    outside (export may share ``x.float()`` with the experts); symbolic-size nodes (shared shape
    arithmetic) are never part of it."""
    nodes = [n for n in scope_nodes(gm, path) if is_tensor_valued(n) or n.target in CHECKS]
    inside = set(nodes)
    shared = {n for n in nodes if n.target in CASTS | CHECKS
              and strip_casts(n.args[0] if n.target in CHECKS else n, inside) not in inside}
    return [n for n in nodes if n not in shared]


def _is_int(n) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and not v.is_floating_point()
