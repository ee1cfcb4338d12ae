"""Small FX helpers shared by the passes and the lowerings: scopes, attributes, metadata, region removal."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from dsmoe.ir import CAPTURE_PREFIX, module_path
from dsmoe.passes.context import PassResult

aten = torch.ops.aten
# Nodes that only check or describe values: they die with the values they talk about.
CHECKS = {aten._assert_scalar.default, aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}
CASTS = {aten.to.dtype, aten._to_copy.default}
SYM_OPS = {aten.sym_size.int, operator.ge, operator.le, operator.gt, operator.lt, operator.eq,
           operator.add, operator.mul, operator.sub, operator.floordiv}


def modules_of_class(gm: GraphModule, cls_name: str) -> list[str]:
    """Module paths (without the capture prefix) whose class is ``cls_name``, in graph order."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
            if name.split(".")[-1] == cls_name:
                seen.setdefault(path.removeprefix(CAPTURE_PREFIX), None)
    return list(seen)


class NoMatch(Exception):
    """A module's region does not check out; the message is the reason it is left alone."""


def rewrite_modules(gm: GraphModule, cls_name: str, done, match: Callable[[str], object],
                    rewrite: Callable[[str, object], None]) -> PassResult:
    """A match-then-rewrite pass over every module of class ``cls_name``: a module whose scope
    already holds a ``done`` node is passed over (idempotence); ``match(path)`` returns what
    ``rewrite(path, m)`` needs, or raises :class:`NoMatch` and the module is reported skipped with
    the reason; :func:`cleanup` once if anything was rewritten."""
    result = PassResult()
    for path in modules_of_class(gm, cls_name):
        if any(n.target == done for n in scope_nodes(gm, path)):
            continue
        try:
            m = match(path)
        except NoMatch as e:
            result.skip(path, str(e))
            continue
        rewrite(path, m)
        result.rewrites += 1
    if result.rewrites:
        cleanup(gm)
    return result


def strip_casts(n: Node, region: set[Node] | None = None) -> Node:
    """Follow dtype casts back to the value they cast (staying inside ``region`` when given)."""
    while isinstance(n, Node) and (region is None or n in region) and n.target in CASTS:
        n = n.args[0]
    return n


def is_tensor_valued(n: Node) -> bool:
    """Whether a node computes tensors (not symbolic sizes or checks)."""
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v))


def in_scope(node: Node, path: str) -> bool:
    p = module_path(node)
    return p == path or p.startswith(path + ".")


def scope_nodes(gm: GraphModule, path: str) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and in_scope(n, path)]


def is_call(node: object, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == target


def attr(gm: GraphModule, node: Node) -> torch.Tensor:
    """The tensor behind a ``get_attr`` node."""
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def attr_owner_path(node: Node) -> str:
    """``lm.model.layers.1.mlp.gate.weight`` → ``model.layers.1.mlp.gate``."""
    return node.target.removeprefix(CAPTURE_PREFIX).rsplit(".", 1)[0]


def add_param(gm: GraphModule, owner: str, name: str, value: torch.Tensor, *, before: Node) -> Node:
    """Register ``value`` as parameter ``name`` of submodule ``<owner>`` (under the capture's
    ``lm.`` when the graph is a captured decoder) and return its get_attr."""
    root = CAPTURE_PREFIX.rstrip(".")
    target_owner = f"{CAPTURE_PREFIX}{owner}" if hasattr(gm, root) else owner
    mod = gm.get_submodule(target_owner)
    mod.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{target_owner}.{name}")


def add_buffer_beside(gm: GraphModule, like: Node, name: str, value: torch.Tensor) -> Node:
    """Register ``value`` as buffer ``name`` of the module owning get_attr ``like``; return its
    get_attr (inserted before ``like``). Lowerings use it for re-laid-out copies of weights."""
    owner = like.target.rsplit(".", 1)[0]
    gm.get_submodule(owner).register_buffer(name, value.detach(), persistent=True)
    with gm.graph.inserting_before(like):
        return gm.graph.get_attr(f"{owner}.{name}")


def fake_val(target, *args, **kwargs):
    """The ``meta["val"]`` of ``target(*args)`` computed on the args' fake tensors."""
    vals = map_arg(args, lambda a: a.meta.get("val"))
    kvals = map_arg(kwargs, lambda a: a.meta.get("val"))
    leaves = [v for v in torch.utils._pytree.tree_leaves((vals, kvals)) if isinstance(v, torch.Tensor)]
    mode = torch._guards.detect_fake_mode(leaves)
    if mode is None:
        return None
    with mode:
        return target(*vals, **kvals)


def new_node(gm: GraphModule, target, args: tuple, kwargs: dict | None = None, *, meta_from: Node,
             before: Node | None = None) -> Node:
    """Insert ``call_function(target)`` before ``before`` (default: ``meta_from``) with meta copied
    from ``meta_from`` and a fresh ``val``."""
    with gm.graph.inserting_before(before or meta_from):
        n = gm.graph.call_function(target, args, kwargs or {})
    n.meta.update({k: v for k, v in meta_from.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    get_attr_vals(gm, args)
    val = fake_val(target, *args, **(kwargs or {}))
    if val is not None:
        n.meta["val"] = val
    return n


def get_attr_vals(gm: GraphModule, args: Iterable) -> None:
    """Give get_attr nodes a fake ``val`` (needed to compute new nodes' metadata)."""
    for a in args:
        if isinstance(a, Node) and a.op == "get_attr" and "val" not in a.meta:
            ref = next((n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)), None)
            mode = torch._guards.detect_fake_mode([ref.meta["val"]]) if ref is not None else None
            if mode is not None:
                a.meta["val"] = mode.from_tensor(attr(gm, a), static_shapes=True)


def erase_region(gm: GraphModule, nodes: Iterable[Node]) -> int:
    """Erase ``nodes`` (whose outputs have been rewired) plus the checks and symbolic-size nodes
    that only talk about them. Raises if a region node is still used outside the region."""
    region = set(nodes)
    frontier = list(region)
    while frontier:  # pull in checks/sym nodes hanging off the region
        n = frontier.pop()
        for u in n.users:
            if u not in region and (u.target in CHECKS or u.target in SYM_OPS):
                region.add(u)
                frontier.append(u)
    order = [n for n in gm.graph.nodes if n in region]
    for n in reversed(order):
        outside = [u for u in n.users if u not in region]
        if outside:
            raise RuntimeError(f"cannot erase {n.name}: still used by {[u.name for u in outside]}")
        gm.graph.erase_node(n)
        region.discard(n)
    return len(order)


def cleanup(gm: GraphModule) -> None:
    """Once per pass that changed something: dead code, unused parameters, recompile.

    A metadata assertion on a value nothing else reads is dead too (it would pin the value)."""
    changed = True
    while changed:
        gm.graph.eliminate_dead_code()
        lone = [n for n in gm.graph.nodes
                if n.target == aten._assert_tensor_metadata.default and len(n.args[0].users) == 1]
        for n in lone:
            gm.graph.erase_node(n)
        changed = bool(lone)
    drop_unused_attrs(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def drop_unused_attrs(gm: GraphModule) -> None:
    """Delete the parameters and buffers no get_attr node reads (so rewritten weights are not kept twice)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)

