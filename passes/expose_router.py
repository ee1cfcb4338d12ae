"""expose_router (optional, ``PassContext.router_stats``): Rewrite the decoder's outputs
``(logits, present)`` → ``(logits, present, router)``, the router's choices as graph outputs.

``router`` is ``{layer: {field: tensor}}`` over the MoE layers in order, ``T = B·S`` tokens (row
``b·S + s``), the fields of :data:`ROUTER_FIELDS`:

- ``ids [T,K] int32`` and ``weights [T,K] fp32``: the outputs of the layer's ``dsmoe::route``
  (the experts each token chose, and their mixing weights);
- ``routed_norm [T] fp32`` and ``shared_norm [T] fp32``: the L2 norm of each token's routed
  (``dsmoe::moe``) and shared-experts (``dsmoe::gated_mlp``) contribution to the MoE output.
  Present only where both ops are separate (not after ``fold_shared_experts``); a model without
  shared experts has ``routed_norm`` alone.

Nothing the graph computed before changes: the new nodes only read existing values (the routes,
the MoE and shared MLP outputs) and feed the output. The ONNX export names them
``router.{layer}.{field}`` (:func:`router_output_name`). The layers and fields exposed are kept in
``gm.meta["dsmoe_router"]`` (``{layer: [field, ...]}``); a graph that has them is left alone
(idempotence).

Skipped (reported): a MoE layer without exactly one ``dsmoe::route`` (``fuse_router`` did not fuse
it); the whole pass, when the graph's outputs are not the decoder's ``(logits, present)``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from dsmoe.contract import MOE_BLOCK, ROUTER_ATTR, SHARED_ATTR, layer_of
from dsmoe.ops import GATED_MLP, MOE, ROUTE
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.graph import modules_of_class, new_node, scope_nodes

aten = torch.ops.aten
ROUTER_FIELDS = ("ids", "weights", "routed_norm", "shared_norm")
ROUTER_META = "dsmoe_router"
ROUTER_PREFIX = "router."


def router_output_name(layer: int, field: str) -> str:
    """The graph output (and ONNX output) name of one exposed router value: ``router.{layer}.{field}``."""
    return f"{ROUTER_PREFIX}{layer}.{field}"


def parse_router_output_name(name: str) -> tuple[int, str] | None:
    """``router.{layer}.{field}`` → ``(layer, field)``; None for any other name."""
    layer, _, field = name.removeprefix(ROUTER_PREFIX).partition(".")
    if not name.startswith(ROUTER_PREFIX) or not layer.isdigit() or field not in ROUTER_FIELDS:
        return None
    return int(layer), field


def expose_router(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    if gm.meta.get(ROUTER_META) is not None:
        return result  # already exposed (idempotence)
    config = ctx.config_of(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    info = getattr(gm.graph._codegen, "pytree_info", None)
    outputs = pytree.tree_unflatten(list(out.args[0]), info.out_spec) if info is not None else None
    if not (isinstance(outputs, tuple) and len(outputs) == 2):
        result.skip("graph", "the outputs are not the decoder's (logits, present)")
        return result
    router: dict[int, dict[str, Node]] = {}
    for path in modules_of_class(gm, MOE_BLOCK):
        routes = [n for n in scope_nodes(gm, f"{path}.{ROUTER_ATTR}") if n.target == ROUTE]
        if len(routes) != 1:
            result.skip(path, f"expected one dsmoe::route in {path}.{ROUTER_ATTR}, found {len(routes)}")
            continue
        fields = {"ids": _item(gm, routes[0], 1, out), "weights": _item(gm, routes[0], 0, out)}
        moes = [n for n in scope_nodes(gm, path) if n.target == MOE]
        shared = [n for n in scope_nodes(gm, f"{path}.{SHARED_ATTR}") if n.target == GATED_MLP]
        separate = len(shared) == 1 or not config.n_shared_experts  # folded: the shared part is inside the moe
        if len(moes) == 1 and separate:
            fields["routed_norm"] = _norm(gm, moes[0], out)
            if shared:
                fields["shared_norm"] = _norm(gm, shared[0], out)
        router[layer_of(path)] = fields
        result.rewrites += 1
    if not router:
        return result
    flat, spec = pytree.tree_flatten((*outputs, router))
    out.args = (tuple(flat),)
    gm.graph._codegen.pytree_info = info._replace(out_spec=spec)
    gm.meta[ROUTER_META] = {layer: list(f) for layer, f in router.items()}
    gm.graph.lint()
    gm.recompile()
    return result


def _item(gm: GraphModule, route: Node, i: int, out: Node) -> Node:
    """``route[i]`` (the existing getitem, or a new one)."""
    found = [u for u in route.users if u.target is operator.getitem and u.args[1] == i]
    return found[0] if found else new_node(gm, operator.getitem, (route, i), meta_from=route, before=out)


def _norm(gm: GraphModule, y: Node, out: Node) -> Node:
    """``‖y[t]‖₂`` per token in fp32 (``y [T,H]``)."""
    return new_node(gm, aten.linalg_vector_norm.default, (y, 2.0, [-1], False), {"dtype": torch.float32},
                    meta_from=y, before=out)
