"""outline_moe: Rewrite the routed-experts region of each MoE layer → one ``dsmoe::moe``.

Pattern (in a ``DeepseekMoE`` scope, outside its ``gate`` and ``shared_experts``; the form the
reference model traces under ``torch.export``): a chain ``acc = acc + f(expert_e(x)) · w_e``
starting from zeros, one link per expert e, where ``expert_e(x)`` is ``down(silu(gate(x)) *
up(x))`` on the layer's ``x``, ``f`` is an optional fp32 cast and ``w_e = sum(w * (ids == e),
-1, keepdim)`` is the routing weight token t gives expert e (0 when it did not pick e).

Result: ``y = dsmoe::moe(x, w, ids, w13, w2, "silu")`` with the experts' weights stacked into
two new parameters of ``model.layers.N.mlp.experts`` — ``w13 [E, 2I, H]`` (gate rows, then up
rows) and ``w2 [E, H, I]`` — and the per-expert parameters removed from the module (so the
stacked copies replace them rather than doubling memory). ``ids`` produced by ``dsmoe::route``
are consumed as int32 directly (the int64 cast ``fuse_router`` left for other users dies).

Preconditions (else the region is left alone and reported): one add chain of exactly E expert
links from a zeros accumulator; every expert 0..E-1 present, once, with the SwiGLU pattern and
its own ``ids == e`` weight; one shared ``x``, ``ids`` and ``w`` for all experts; nothing inside
the region used outside it.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from dsmoe.contract import (DOWN_PROJ, EXPERTS_ATTR, GATE_PROJ, MOE_BLOCK, PROJS, ROUTER_ATTR, SHARED_ATTR, STACKED_W2,
                            STACKED_W13, UP_PROJ, expert_linear)
from dsmoe.functional import stack_gate_up
from dsmoe.ir import module_path
from dsmoe.ops import MOE, ROUTE
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.graph import (NoMatch, add_param, attr, erase_region, in_scope, is_call, is_tensor_valued, new_node,
                                rewrite_modules, scope_nodes, strip_casts)

aten = torch.ops.aten
ZEROS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}


def outline_moe(gm: GraphModule, ctx: PassContext) -> PassResult:
    E = ctx.config_of(gm).n_routed_experts
    return rewrite_modules(gm, MOE_BLOCK, MOE, lambda path: _match(gm, path, E), lambda path, m: _rewrite(gm, path, m))


def _match(gm: GraphModule, path: str, E: int) -> dict:
    nodes = [n for n in scope_nodes(gm, path)
             if not in_scope(n, f"{path}.{ROUTER_ATTR}") and not in_scope(n, f"{path}.{SHARED_ATTR}")]
    scope = set(nodes)
    experts: dict[int, dict[str, Node]] = {}
    pat = expert_linear(path)
    for n in nodes:
        mm = pat.match(module_path(n))
        if mm and is_call(n, aten.linear.default):
            experts.setdefault(int(mm.group(1)), {})[mm.group(2)] = n
    if sorted(experts) != list(range(E)) or any(len(v) != 3 for v in experts.values()):
        raise NoMatch(f"found {len(experts)} experts with gate/up/down linears; the config has {E} experts")
    down_of = {lin[DOWN_PROJ]: e for e, lin in experts.items()}

    chains = [c for c in (_chain(z, scope, down_of) for z in nodes if z.target in ZEROS) if c]
    if len(chains) != 1:
        raise NoMatch(f"expected one add chain of expert contributions from zeros, found {len(chains)}")
    chain = chains[0]
    if len(chain) != E:
        raise NoMatch(f"combine chain has {len(chain)} links for {E} experts")
    xs, idss, ws = set(), set(), set()
    seen = set()
    for _, (e, ids, w) in chain:
        if e in seen:
            raise NoMatch(f"expert {e} contributes twice")
        seen.add(e)
        idss.add(ids)
        ws.add(w)
        g, u, d = (experts[e][k] for k in PROJS)
        act = d.args[0]
        if not (is_call(act, aten.mul.Tensor) and u in act.args
                and any(is_call(a, aten.silu.default) and a.args[0] is g for a in act.args)):
            raise NoMatch(f"expert {e} is not down(silu(gate(x)) * up(x))")
        if g.args[0] is not u.args[0]:
            raise NoMatch(f"expert {e}'s gate and up read different inputs")
        xs.add(g.args[0])
    if len(xs) != 1 or len(idss) != 1 or len(ws) != 1:
        raise NoMatch(f"experts read {len(xs)} inputs, {len(idss)} id tensors, {len(ws)} weight tensors (expected 1 each)")
    x, ids, w = xs.pop(), idss.pop(), ws.pop()

    out = chain[-1][0]
    region = _backward_slice(out, stop={x, ids, w}, scope=scope)
    leaks = [n.name for n in region if n is not out and any(u not in region and u.target not in _SIDE for u in n.users)]
    if leaks:
        raise NoMatch(f"values of the region are used outside it: {leaks[:3]}")
    return dict(x=x, ids=ids, w=w, out=out, region=region, experts=experts)


def _chain(acc: Node, scope: set[Node], down_of: dict[Node, int]) -> list[tuple[Node, tuple]]:
    """The links ``acc = add(acc, contribution)`` following ``acc`` while they add an expert's
    output, each with its :func:`_contribution` ``(e, ids, w)``."""
    links = []
    while True:
        nxt = [u for u in acc.users if is_call(u, aten.add.Tensor) and u.args[0] is acc and u in scope]
        got = _contribution(nxt[0].args[1], down_of) if len(nxt) == 1 else None
        if got is None:
            return links
        links.append((nxt[0], got))
        acc = nxt[0]


def _contribution(n: Node, down_of: dict[Node, int]):
    """``(e, ids, w)`` when ``n`` is ``cast?(down_e) * sum(w * (ids == e), -1, keepdim)``, else None."""
    if not is_call(n, aten.mul.Tensor) or len(n.args) != 2:
        return None
    for a, b in (n.args, n.args[::-1]):
        d = strip_casts(a) if isinstance(a, Node) else None
        if d not in down_of or not is_call(b, aten.sum.dim_IntList):
            continue
        dims = [int(x) for x in b.args[1]] if len(b.args) > 1 else []
        if dims not in ([-1], [1]) or not (len(b.args) > 2 and b.args[2]) or not is_call(b.args[0], aten.mul.Tensor):
            return None
        m = b.args[0]
        eqs = [x for x in m.args if is_call(x, aten.eq.Scalar)]
        if len(eqs) != 1 or len(m.args) != 2:
            return None
        eq = eqs[0]
        w = m.args[1] if m.args[0] is eq else m.args[0]
        e = down_of[d]
        if eq.args[1] != e or not isinstance(w, Node):
            return None
        return e, eq.args[0], w
    return None


_SIDE = {aten._assert_scalar.default, aten._assert_tensor_metadata.default, aten.sym_size.int}


def _backward_slice(out: Node, *, stop: set[Node], scope: set[Node]) -> set[Node]:
    region, frontier = set(), [out]
    while frontier:
        n = frontier.pop()
        if n in region or n in stop or n not in scope or not is_tensor_valued(n):
            continue  # symbolic sizes (shared shape arithmetic) stay outside
        region.add(n)
        frontier.extend(a for a in n.all_input_nodes if a.op == "call_function")
    return region


def _rewrite(gm: GraphModule, path: str, m: dict) -> None:
    experts, out = m["experts"], m["out"]
    E = len(experts)
    gate = [attr(gm, experts[e][GATE_PROJ].args[1]) for e in range(E)]
    up = [attr(gm, experts[e][UP_PROJ].args[1]) for e in range(E)]
    down = [attr(gm, experts[e][DOWN_PROJ].args[1]) for e in range(E)]
    w13 = torch.stack([stack_gate_up(g, u) for g, u in zip(gate, up)])  # [E, 2I, H]
    w2 = torch.stack(down)  # [E, H, I]
    del gate, up, down
    first = out  # x, w and ids are all defined before the region's last node
    w13_node = add_param(gm, f"{path}.{EXPERTS_ATTR}", STACKED_W13, w13, before=first)
    w2_node = add_param(gm, f"{path}.{EXPERTS_ATTR}", STACKED_W2, w2, before=first)
    ids = m["ids"]
    if is_call(ids, aten._to_copy.default) and is_call(ids.args[0], operator.getitem) \
            and is_call(ids.args[0].args[0], ROUTE):
        ids = ids.args[0]  # route's int32 ids
    moe = new_node(gm, MOE, (m["x"], m["w"], ids, w13_node, w2_node, "silu"), meta_from=out, before=first)
    y = moe
    if moe.meta["val"].dtype != out.meta["val"].dtype:
        y = new_node(gm, aten._to_copy.default, (moe,), {"dtype": out.meta["val"].dtype}, meta_from=out, before=first)
    out.replace_all_uses_with(y, delete_user_cb=lambda u: u not in m["region"])
    erase_region(gm, m["region"])
