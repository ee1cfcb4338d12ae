"""Per-target lowering of the fused IR: one table per target, one function per ``dsmoe`` op.

:func:`lower` rewrites a fused ``GraphModule`` in place so that ``torch.onnx.export(...,
dynamo=True)`` can take it: every ``dsmoe::*`` node is replaced by a call to a plain Python
function built from ATen ops and, for contrib ops, ``torch.onnx.ops.symbolic``. The export traces
through those functions, so the ONNX graph holds exactly what they emit.

Targets:

- ``ort``: ``dsmoe::moe`` → one ``com.microsoft.MoE`` (SwiGLU, gate/up interleaved, the layout
  ORT's CPU kernel wants). Routing:

  * softmax greedy (DeepSeekMoE 16B, V2-Lite): the router logits feed the op directly; ORT
    applies softmax + top-k itself (``normalize_routing_weights`` = the effective
    ``norm_topk_prob``; an unnormalized ``routed_scaling_factor`` ≠ 1 multiplies the output,
    which is linear in the weights).
  * every other routing (group-limited, sigmoid + bias, any ``moe`` whose weights do not come
    straight from ``dsmoe::route``): route in standard ops, then feed *masked logits*
    ``log(w)`` at the selected ids and −inf elsewhere, and multiply the output by ``Σw``.
    ORT's softmax of those logits is ``w/Σw`` on the selected ids and exactly 0 elsewhere, so
    its top-k picks exactly our ids (a zero-weight id that ties contributes 0 either way), and
    ``Σw · Σ_k (w_k/Σw)·f_k = Σ_k w_k·f_k``. QMoE's ``router_weights`` would also separate
    selection from mixing, but QMoE takes only quantized (uint8 / fp8) weights, so it is not
    exact for fp32/fp16 models.
  * shared experts and dense MLPs (``dsmoe::gated_mlp``): standard ops, one MatMul with
    concatenated gate/up, then the down MatMul.
- ``portable``: standard ONNX ops only. Routing in standard ops; the routed experts computed
  *densely*: every expert on every token as two batched MatMuls over the stacked weights, mixed by
  a ``[T,E]`` matrix holding the routing weights at the selected ids and exact zeros elsewhere (so
  the result is exact: unselected experts contribute 0·finite = 0). It costs E/K× the routed
  FLOPs, but the graph stays small and shape-static; a per-expert NonZero/Gather/ScatterND
  dispatch (work ∝ routed tokens) was tried and made export time grow with E (67 s for the tiny
  preset's 8 experts vs 16 s dense, on 2 cores). Gated MLPs as above.

- ``tensorrt``: ``dsmoe::route`` → one ``DsRoute`` and ``dsmoe::moe`` → one ``DsMoE`` plugin node
  (:mod:`dsmoe.plugins.trt`): op type = plugin name in domain ``trt.plugins``, attributes
  ``plugin_version``, ``plugin_namespace`` and one per plugin field, weights as initializer inputs
  in the canonical layout (``w13 [E,2I,H]`` gate rows first, ``w2 [E,H,I]``, the router's bias in
  fp32). TensorRT's ONNX parser imports an op type it does not know through its plugin fallback,
  whatever the domain. Gated MLPs as above (TensorRT's own MatMuls). Shapes the plugins' AOT
  kernels cannot take (H or I not divisible by 16, too many experts) are refused here.

Every target: ``dsmoe::mla_attention`` → the absorbed form in standard ops
(:func:`dsmoe.ops.mla_absorbed`: MatMul of q's nope part into the latent space, one batched
MatMul of all heads against the single-head latent cache for the scores, Softmax, one for the
weighted sum, MatMul by the value half). One graph serves prefill and decode, so it takes the
absorbed form for both (the CPU kernel's per-call choice would need an ``If``); that is the form
decode wants, and the one a prefill pays for in FLOPs (measured in ``benchmarks/mla_decode.py``).

A node a target cannot take raises :class:`LoweringError` naming the node and the reason.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from dsmoe.passes.graph import add_buffer_beside, attr, drop_unused_attrs
from dsmoe.plugins.moe.config import validate_moe
from dsmoe.plugins.route.config import validate_route
from dsmoe.plugins.trt.spec import ALIGN_BYTES, ONNX_DOMAIN
from dsmoe.plugins.trt.spec import MOE as TRT_MOE
from dsmoe.plugins.trt.spec import ROUTE as TRT_ROUTE
from torch.fx import GraphModule, Node

from dsmoe.errors import DsmoeError
from dsmoe.functional import ACTIVATIONS, gated_mlp, glu
from dsmoe.ops import FUSED_OPS, GATED_MLP, MLA_ATTENTION, MOE, ROUTE, mla_absorbed, route_reference
from dsmoe.routing import RoutingSpec

TARGETS = ("ort", "portable", "tensorrt")
ORT_DOMAIN = "com.microsoft"


class LoweringError(DsmoeError):
    """A fused node the chosen target cannot take (the message names the node and why)."""


@dataclass
class LowerReport:
    target: str
    lowered: dict[str, dict[str, int]] = field(default_factory=dict)  # op → {lowering name: count}

    def count(self, op: str, how: str) -> None:
        self.lowered.setdefault(op, Counter())[how] += 1

    def as_dict(self) -> dict:
        return {"target": self.target, "lowered": {k: dict(v) for k, v in self.lowered.items()}}


# ---- the functions the lowered graph calls (traced by torch.onnx.export) ---------------------
# ``dsmoe::route`` and ``dsmoe::gated_mlp`` lower to their reference math, which is plain torch
# (:func:`dsmoe.ops.route_reference`, :func:`dsmoe.functional.gated_mlp`): the export traces it
# into standard ops. ``dsmoe::moe`` has a lowering per target:

def _ort_moe_node(x, router_probs, w13i, w2, *, k: int, normalize: bool):
    """One ``com.microsoft.MoE`` (SwiGLU, interleaved gate/up, no biases)."""
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=int(normalize), use_sparse_mixer=0)
    return torch.onnx.ops.symbolic(f"{ORT_DOMAIN}::MoE", (x, router_probs, w13i, None, w2), attrs,
                                   dtype=x.dtype, shape=x.shape, version=1)


def ort_moe_softmax_greedy(x, x_router, w_gate, w13i, w2, *, k: int, normalize: bool, scale: float):
    """Softmax-greedy routing inside the op: ``router_probs`` are the router logits."""
    logits = F.linear(x_router.float(), w_gate.float()).to(x.dtype)
    y = _ort_moe_node(x, logits, w13i, w2, k=k, normalize=normalize)
    return y if scale == 1.0 else y * scale


def ort_moe_masked(x, weights, ids, w13i, w2, *, num_experts: int):
    """Any routing: masked logits (log w at ids, −inf elsewhere), output rescaled by Σw."""
    w = weights.float()
    T, K = w.shape
    logits = torch.full((T, num_experts), float("-inf"), dtype=torch.float32, device=x.device)
    logits = logits.scatter(1, ids.long(), w.log())
    y = _ort_moe_node(x, logits.to(x.dtype), w13i, w2, k=K, normalize=False)
    return (y.float() * w.sum(dim=-1, keepdim=True)).to(x.dtype)


def moe_dense_std(x, weights, ids, w13t, w2t):
    """``dsmoe::moe`` in standard ops: every expert on every token (two batched MatMuls over the
    stacked experts), mixed by a dense ``[T,E]`` weight matrix that is 0 off the selected ids."""
    T, E = x.shape[0], w13t.shape[0]
    combine = torch.zeros((T, E), dtype=torch.float32, device=x.device).scatter_add(1, ids.long(), weights.float())
    gu = torch.matmul(x.unsqueeze(0), w13t)  # [E,T,2I]
    out = torch.matmul(glu(gu, "silu"), w2t)  # [E,T,H]
    return (out.float() * combine.transpose(0, 1).unsqueeze(-1)).sum(dim=0).to(x.dtype)


def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """``[.., 2I, K]`` gate rows then up rows → rows interleaved ``g0, u0, g1, u1, …`` (what ORT's
    ``MoE``/``QMoE`` CPU kernels take with ``swiglu_fusion=1``)."""
    *lead, twoI, K = w13.shape
    return w13.reshape(*lead, 2, twoI // 2, K).transpose(-3, -2).reshape(*lead, twoI, K).contiguous()


def trt_route(x, w_gate, bias, *, attrs: dict):
    """One ``DsRoute`` plugin node: ``(weights [T,K] fp32, ids [T,K] int32)``."""
    T, K = x.shape[0], attrs["top_k"]
    inputs = (x, w_gate) if bias is None else (x, w_gate, bias.float())
    weights, ids = torch.onnx.ops.symbolic_multi_out(
        f"{ONNX_DOMAIN}::{TRT_ROUTE.name}", inputs, attrs, dtypes=(torch.float32, torch.int32),
        shapes=((T, K), (T, K)), version=1)
    return weights, ids


def trt_moe(x, weights, ids, w13, w2, *, attrs: dict):
    """One ``DsMoE`` plugin node: ``y [T,H]`` in x's dtype."""
    return torch.onnx.ops.symbolic(f"{ONNX_DOMAIN}::{TRT_MOE.name}",
                                   (x, weights.float(), ids.to(torch.int32), w13, w2), attrs,
                                   dtype=x.dtype, shape=x.shape, version=1)


# ---- per-op lowerings: (gm, node, report) → replaces the node ----------------------------------

def _check_activation(node: Node, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise LoweringError(f"{node.name} ({FUSED_OPS[node.target]}): activation {activation!r} has no lowering "
                            f"(supported: {', '.join(ACTIVATIONS)})")


def _lower_route_std(gm: GraphModule, node: Node, report: LowerReport) -> None:
    node.target = route_reference
    report.count("dsmoe::route", "standard ops")


def _lower_gated_mlp_std(gm: GraphModule, node: Node, report: LowerReport) -> None:
    _check_activation(node, node.args[3])
    node.target = gated_mlp
    report.count("dsmoe::gated_mlp", "standard ops (MatMul gate|up, MatMul down)")


def _lower_mla_std(gm: GraphModule, node: Node, report: LowerReport) -> None:
    node.target = mla_absorbed
    report.count("dsmoe::mla_attention", "standard ops (absorbed: latent cache, MatMul per head group)")


def _route_of(node: Node) -> Node | None:
    """The ``dsmoe::route`` node whose (weights, ids) are this moe's (weights, ids), if any."""
    w, ids = node.args[1], node.args[2]
    if not all(isinstance(a, Node) and a.target is operator.getitem for a in (w, ids)):
        return None
    r = w.args[0]
    if r is not ids.args[0] or r.target is not ROUTE or (w.args[1], ids.args[1]) != (0, 1):
        return None
    return r


def _lower_moe_ort(gm: GraphModule, node: Node, report: LowerReport) -> None:
    x, weights, ids, w13_n, w2_n, activation = node.args
    _check_activation(node, activation)
    if w13_n.op != "get_attr" or w2_n.op != "get_attr":
        raise LoweringError(f"{node.name} (dsmoe::moe): expert weights must be parameters for com.microsoft.MoE")
    w13 = attr(gm, w13_n)
    E = w13.shape[0]
    w13i_n = add_buffer_beside(gm, w13_n, "w13_interleaved", interleave_gate_up(w13))
    route = _route_of(node)
    spec = RoutingSpec.from_node(route) if route is not None else None
    if spec is not None and spec.scoring == "softmax" and not spec.group_limited and route.args[2] is None:
        node.target = ort_moe_softmax_greedy
        node.args = (x, route.args[0], route.args[1], w13i_n, w2_n)
        node.kwargs = dict(k=spec.top_k, normalize=spec.norm_topk_prob,
                           scale=float(spec.scaling) if spec.scaled else 1.0)
        report.count("dsmoe::moe", "com.microsoft.MoE (router logits, softmax greedy)")
    else:
        node.target = ort_moe_masked
        node.args = (x, weights, ids, w13i_n, w2_n)
        node.kwargs = dict(num_experts=E)
        report.count("dsmoe::moe", "com.microsoft.MoE (masked logits, rescaled)")


def _lower_moe_portable(gm: GraphModule, node: Node, report: LowerReport) -> None:
    x, weights, ids, w13_n, w2_n, activation = node.args
    _check_activation(node, activation)
    if w13_n.op != "get_attr" or w2_n.op != "get_attr":
        raise LoweringError(f"{node.name} (dsmoe::moe): expert weights must be parameters")
    # Pre-transposed once here so the graph holds no runtime Transpose of the expert weights.
    w13t = add_buffer_beside(gm, w13_n, "w13_t", attr(gm, w13_n).transpose(1, 2).contiguous())
    w2t = add_buffer_beside(gm, w2_n, "w2_t", attr(gm, w2_n).transpose(1, 2).contiguous())
    node.target = moe_dense_std
    node.args = (x, weights, ids, w13t, w2t)
    report.count("dsmoe::moe", "standard ops (dense experts, masked mixing)")


def _lower_route_trt(gm: GraphModule, node: Node, report: LowerReport) -> None:
    spec = RoutingSpec.from_node(node)
    x, w_gate, bias = node.args[:3]
    if w_gate.op != "get_attr":
        raise LoweringError(f"{node.name} (dsmoe::route): the router weight must be a parameter (a plugin initializer)")
    E, H = attr(gm, w_gate).shape
    try:
        validate_route(1, H, E, **spec.as_kwargs())
    except ValueError as e:
        raise LoweringError(f"{node.name} (dsmoe::route) cannot be a {TRT_ROUTE.name} plugin: {e}") from None
    if H % ALIGN_BYTES:
        raise LoweringError(f"{node.name} (dsmoe::route): H={H} is not divisible by {ALIGN_BYTES}, which the "
                            f"{TRT_ROUTE.name} plugin's kernels assume")
    node.target = trt_route
    node.args = (x, w_gate, bias)
    node.kwargs = dict(attrs=TRT_ROUTE.node_attributes({**spec.as_kwargs(),
                                                       "norm_topk_prob": int(spec.norm_topk_prob)}))
    report.count("dsmoe::route", f"{TRT_ROUTE.name} plugin")


def _lower_moe_trt(gm: GraphModule, node: Node, report: LowerReport) -> None:
    x, weights, ids, w13_n, w2_n, activation = node.args
    _check_activation(node, activation)
    if activation not in TRT_MOE.field("activation").choices:
        raise LoweringError(f"{node.name} (dsmoe::moe): the {TRT_MOE.name} plugin has no activation {activation!r}")
    if w13_n.op != "get_attr" or w2_n.op != "get_attr":
        raise LoweringError(f"{node.name} (dsmoe::moe): expert weights must be parameters (plugin initializers)")
    w13, w2 = attr(gm, w13_n), attr(gm, w2_n)
    try:  # the shapes of the weights (T and K are the runtime's)
        _, H, _, _, I = validate_moe((1, w13.shape[-1]), (1, 1), (1, 1), tuple(w13.shape), tuple(w2.shape), w13.dtype,
                                     activation)
    except ValueError as e:
        raise LoweringError(f"{node.name} (dsmoe::moe) cannot be a {TRT_MOE.name} plugin: {e}") from None
    if H % ALIGN_BYTES or I % ALIGN_BYTES or not I:
        raise LoweringError(f"{node.name} (dsmoe::moe): H={H} and I={I} must be multiples of {ALIGN_BYTES}, which "
                            f"the {TRT_MOE.name} plugin's kernels assume")
    node.target = trt_moe
    node.args = (x, weights, ids, w13_n, w2_n)
    node.kwargs = dict(attrs=TRT_MOE.node_attributes({"activation": activation}))
    report.count("dsmoe::moe", f"{TRT_MOE.name} plugin")


# Lowerings that need another node lowered first list it here: ort's softmax-greedy MoE consumes
# the route's inputs (so the route is lowered after the moe, and dies if nothing else uses it).
LOWERINGS: dict[str, dict[object, Callable[[GraphModule, Node, LowerReport], None]]] = {
    "ort": {MOE: _lower_moe_ort, GATED_MLP: _lower_gated_mlp_std, ROUTE: _lower_route_std,
            MLA_ATTENTION: _lower_mla_std},
    "portable": {MOE: _lower_moe_portable, GATED_MLP: _lower_gated_mlp_std, ROUTE: _lower_route_std,
                 MLA_ATTENTION: _lower_mla_std},
    "tensorrt": {MOE: _lower_moe_trt, GATED_MLP: _lower_gated_mlp_std, ROUTE: _lower_route_trt,
                 MLA_ATTENTION: _lower_mla_std},
}


def check_target(target: str) -> None:
    if target not in LOWERINGS:
        raise DsmoeError(f"unsupported target {target!r} (supported: {', '.join(LOWERINGS)})")


def lower(gm: GraphModule, *, target: str) -> LowerReport:
    """Rewrite every ``dsmoe::*`` node of ``gm`` for ``target`` (in place); report what became what."""
    check_target(target)
    return apply_lowerings(gm, LOWERINGS[target], LowerReport(target))


def apply_lowerings(gm: GraphModule, table: dict, report: LowerReport) -> LowerReport:
    """Lower every node whose target is in ``table`` (in the table's order), then check that no
    ``dsmoe`` op is left and clean up; the quantized lowerings (``lower_quant``) share it."""
    target = report.target
    # Lowering order is the table's order (moe before route, see above).
    for op, fn in table.items():
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]:
            fn(gm, node, report)
    left = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace not in ("aten", "prims", "_operator", "onnx_symbolic")]
    if left:
        n = left[0]
        raise LoweringError(f"target {target!r} cannot take node {n.name} ({n.target}): no lowering in its table")
    gm.graph.eliminate_dead_code()
    drop_unused_attrs(gm)
    gm.recompile()
    return report
