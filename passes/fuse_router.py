"""fuse_router: Rewrite each MoE router subgraph → one ``dsmoe::route``.

Pattern (the nodes of one ``MoEGate`` scope, ``model.layers.N.mlp.gate``):
``linear(x, gate.weight)`` in fp32 → softmax | sigmoid → (+ e_score_correction_bias) →
(view [T, G, E/G] → group score (max | sum of top-2) → topk groups → mask) → topk → gather →
(sum, div: normalize) → (mul by a constant: scale), producing ``ids [T,K]`` and
``weights [T,K] fp32``.

Result: ``weights, ids = dsmoe::route(x, gate.weight, bias?, **routing)`` with ``ids`` int32
(the old users of an int64 ``ids`` get an ``aten._to_copy``).

Preconditions checked per region (else it is left alone and reported): exactly one ``linear``
whose weight is the gate's, exactly two values leaving the region (one integer, one floating),
and the routing *the graph computes* equal to the routing the config asks for: scoring op,
correction bias, group limit (G, groups kept, group score), top-k, normalization and the
scaling constant are each read off the graph (:func:`graph_routing`) and compared with
:attr:`DeepseekConfig.routing`; a difference is reported, never silently fused.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from dsmoe.contract import CORRECTION_BIAS, ROUTER
from dsmoe.ops import ROUTE
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.graph import (CASTS, CHECKS, attr_owner_path, cleanup, erase_region, is_call, is_tensor_valued,
                                modules_of_class, new_node, scope_nodes, strip_casts)
from dsmoe.routing import RoutingSpec

aten = torch.ops.aten
SCORING_OPS = {"softmax": {aten.softmax.int, aten._softmax.default}, "sigmoid": {aten.sigmoid.default}}


def fuse_router(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    spec = ctx.config_of(gm).routing
    want = expected_routing(spec)
    for path in modules_of_class(gm, ROUTER):
        region = _region(gm, path)
        if any(n.target == ROUTE for n in region):
            continue  # already fused (idempotence)
        linears = [n for n in region if is_call(n, aten.linear.default)]
        w_gate = strip_casts(linears[0].args[1]) if len(linears) == 1 else None
        if w_gate is None or w_gate.op != "get_attr" or attr_owner_path(w_gate) != path:
            result.skip(path, f"expected one linear on {path}.weight, found {len(linears)}")
            continue
        outputs = [n for n in region if any(u not in region for u in n.users)]
        ints = [n for n in outputs if _is_int(n)]
        floats = [n for n in outputs if not _is_int(n)]
        if len(ints) != 1 or len(floats) != 1:
            result.skip(path, f"expected one ids and one weights output, found {[n.name for n in outputs]}")
            continue
        got = graph_routing(region)
        diff = [f"config {k} {v!r}, graph computes {got.get(k)!r}" for k, v in want.items() if got.get(k) != v]
        if diff:
            result.skip(path, "the graph's routing is not the config's: " + "; ".join(diff))
            continue
        # region inputs: the hidden states (the linear's input, traced back through dtype casts),
        # the gate weight and the optional correction bias
        x = strip_casts(linears[0].args[0])
        bias = _bias(region)
        ids_out, w_out = ints[0], floats[0]
        attrs = spec.as_kwargs()
        args = (x, w_gate, bias, *(attrs[a.name] for a in ROUTE._schema.arguments[3:]))
        route = new_node(gm, ROUTE, args, meta_from=w_out, before=region[0])
        weights = new_node(gm, operator.getitem, (route, 0), meta_from=w_out, before=region[0])
        ids = new_node(gm, operator.getitem, (route, 1), meta_from=ids_out, before=region[0])
        if ids_out.meta["val"].dtype != ids.meta["val"].dtype:
            ids = new_node(gm, aten._to_copy.default, (ids,), {"dtype": ids_out.meta["val"].dtype},
                           meta_from=ids_out, before=region[0])
        inside = set(region)
        ids_out.replace_all_uses_with(ids, delete_user_cb=lambda u, r=inside: u not in r)
        w_out.replace_all_uses_with(weights, delete_user_cb=lambda u, r=inside: u not in r)
        erase_region(gm, region)
        result.rewrites += 1
    if result.rewrites:
        cleanup(gm)
    return result


def expected_routing(spec: RoutingSpec) -> dict[str, Any]:
    """What :func:`graph_routing` must find for ``spec`` (the features a graph can show)."""
    want: dict[str, Any] = {"scoring": spec.scoring, "bias": spec.topk_method == "noaux_tc", "top_k": spec.top_k,
                            "groups": None, "normalized": spec.norm_topk_prob,
                            "scale": float(spec.scaling) if spec.scaled else None}
    if spec.group_limited:
        want["groups"] = (spec.n_group, spec.topk_group, "top2sum" if spec.topk_method == "noaux_tc" else "max")
    return want


def graph_routing(region: list[Node]) -> dict[str, Any]:
    """The routing a gate region computes, read off its ops (keys as :func:`expected_routing`).

    ``groups`` is ``(G, groups kept, "max" | "top2sum")`` when the scores are viewed as
    ``[T, G, E/G]`` and groups are selected, else None; ``scale`` is the constant the weights are
    finally multiplied by (None when they are not).
    """
    found: dict[str, Any] = {"scoring": next((s for s, ops in SCORING_OPS.items()
                                              if any(n.target in ops for n in region)), None)}
    found["bias"] = _bias(region) is not None
    topks = [n for n in region if is_call(n, aten.topk.default)]
    found["top_k"] = topks[-1].args[1] if topks else None
    views = [n for n in region if is_call(n, aten.view.default) and len(n.args[1]) == 3]
    found["groups"] = None
    if views:
        G = views[0].args[1][1]
        kinds = {"max" if is_call(u, aten.max.dim) else "top2sum" if is_call(u, aten.topk.default) and u.args[1] == 2
                 else None for u in views[0].users}
        group_topk = [n for n in topks[:-1] if n not in views[0].users]
        kept = group_topk[-1].args[1] if group_topk else None
        found["groups"] = (G, kept, kinds.pop() if len(kinds) == 1 else None)
    found["normalized"] = any(is_call(n, aten.div.Tensor) for n in region)
    muls = [n for n in region if is_call(n, aten.mul.Tensor) and isinstance(n.args[1], (int, float))]
    found["scale"] = float(muls[-1].args[1]) if muls else None
    return found


def _bias(region: list[Node]) -> Node | None:
    inputs = {strip_casts(a) for n in region for a in n.all_input_nodes}
    bias = [a for a in inputs if a.op == "get_attr" and a.target.endswith(CORRECTION_BIAS)]
    return bias[0] if bias else None


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
