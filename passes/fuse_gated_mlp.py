"""fuse_gated_mlp: Rewrite ``down(silu(gate(x)) * up(x))`` → one ``dsmoe::gated_mlp``.

Pattern (in a ``DeepseekMLP`` scope: the dense MLP of the first layers and the shared experts):
``g = linear(x, gate_proj.weight)``, ``u = linear(x, up_proj.weight)``, ``h = silu(g) * u``,
``y = linear(h, down_proj.weight)``, with no other user of ``g``, ``u`` or ``h``.

Result: ``y = dsmoe::gated_mlp(x, w13, down_proj.weight, "silu")`` where ``w13 [2I, H]`` is the
gate rows then the up rows, a new parameter of the MLP module; the gate/up parameters are removed.

Skipped: the routed experts (``...mlp.experts.N``) — they belong to ``outline_moe``; an MLP that
has biases or any other shape is left alone and reported.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from dsmoe.contract import DOWN_PROJ, GATE_PROJ, PROJS, ROUTED_EXPERT, STACKED_W13, UP_PROJ
from dsmoe.contract import GATED_MLP as MLP_CLASS
from dsmoe.functional import stack_gate_up
from dsmoe.ir import module_path
from dsmoe.ops import GATED_MLP
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.graph import add_param, attr, cleanup, erase_region, is_call, modules_of_class, new_node, scope_nodes

aten = torch.ops.aten


def fuse_gated_mlp(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for path in modules_of_class(gm, MLP_CLASS):
        if ROUTED_EXPERT.search(path):
            continue  # routed experts are outline_moe's
        nodes = scope_nodes(gm, path)
        if not nodes or any(n.target == GATED_MLP for n in nodes):
            continue  # gone (outlined) or already fused (idempotence)
        lin = {p: [n for n in nodes if is_call(n, aten.linear.default) and _proj(n, path) == p]
               for p in PROJS}
        if any(len(v) != 1 for v in lin.values()):
            result.skip(path, "expected one gate_proj, up_proj and down_proj linear")
            continue
        g, u, d = lin[GATE_PROJ][0], lin[UP_PROJ][0], lin[DOWN_PROJ][0]
        h = d.args[0]
        silu = next((a for a in getattr(h, "args", ()) if is_call(a, aten.silu.default) and a.args[0] is g), None)
        if not is_call(h, aten.mul.Tensor) or silu is None or u not in h.args or g.args[0] is not u.args[0]:
            result.skip(path, "not down(silu(gate(x)) * up(x))")
            continue
        if any(len(lin_node.args) > 2 and lin_node.args[2] is not None for lin_node in (g, u, d)):
            result.skip(path, "linear with bias")
            continue
        region = [g, u, silu, h, d]
        if any(user not in region for n in (g, u, silu, h) for user in n.users):
            result.skip(path, "an intermediate value is used outside the MLP")
            continue
        w13 = stack_gate_up(attr(gm, g.args[1]), attr(gm, u.args[1]))  # [2I, H]
        w13_node = add_param(gm, path, STACKED_W13, w13, before=d)
        fused = new_node(gm, GATED_MLP, (g.args[0], w13_node, d.args[1], "silu"), meta_from=d)
        d.replace_all_uses_with(fused)
        erase_region(gm, region)
        result.rewrites += 1
    if result.rewrites:
        cleanup(gm)
    return result


def _proj(node, path: str) -> str:
    p = module_path(node)
    return p[len(path) + 1:] if p.startswith(path + ".") else ""
