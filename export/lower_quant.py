"""Quantized lowerings (``dsmoe-export --quant int8|int4``): weight-only block quantization.

The weights of the fused ops — and, with scope ``all``, of the linears left in the graph
(attention projections, ``lm_head``) — are quantized by :func:`dsmoe.quant.quantize` (blocks along
each weight's input dimension); the router and the embeddings stay in full precision. Each target
gets one function per op, as in :mod:`dsmoe.export.lower`:

- ``ort``:

  * ``dsmoe::moe`` → one ``com.microsoft.QMoE`` (``expert_weight_bits``, ``block_size``,
    ``swiglu_fusion=1`` with gate/up rows interleaved, ``activation_alpha=1``,
    ``activation_beta=0``, ``swiglu_limit=inf`` — SiLU(g)·u exactly — all set explicitly).
    The mixing weights always come through ``router_weights``: ONNX Runtime 1.32's CPU QMoE
    renormalizes the top-k softmax of ``router_probs`` whatever ``normalize_routing_weights``
    says (measured), which is wrong for DeepSeekMoE's unnormalized weights. Softmax greedy routing
    feeds the router logits as ``router_probs`` (the op picks the top-k itself) and
    ``softmax(logits)·scale`` as ``router_weights`` (``normalize_routing_weights`` = the effective
    ``norm_topk_prob``); every other routing is computed in standard ops and fed as a one-hot
    selection (``router_probs``: 1 at the chosen ids, 0 elsewhere, so the op's top-k is exactly
    our ids) and the weights scattered into ``router_weights``. Both are exact: no masked-logits
    ``log``/``exp`` round trip.
  * ``dsmoe::gated_mlp`` (shared experts, dense MLPs) → ``MatMulNBits`` on the fused gate|up
    weight, SwiGLU in standard ops, ``MatMulNBits`` on the down weight.
  * ``aten.linear`` of an ``nn.Linear`` in scope → ``MatMulNBits`` (bias as its bias input).

  Every quantized matmul runs at ``accuracy_level`` 4 (:data:`ACCURACY_LEVEL`): int8 activations,
  the only fast CPU path (int4 decode GEMV 0.19–0.26 ms vs 0.60 ms at level 0 for 8192×2048;
  block-wise int8 QMoE has no fp32 path at all). The reference model emulates it bit for bit
  (:func:`dsmoe.quant.qlinear` with ``act_quant``), so the export still checks to fp32 tolerance.
- ``portable`` (standard ONNX only): every quantized weight is a blocked ``DequantizeLinear``
  (opset 21; ``INT4``/``INT8`` codes without zero points when symmetric, ``UINT4``/``UINT8`` with
  them when asymmetric) feeding the same MatMuls as the unquantized lowering. Activations stay
  fp32, so the reference is the plain dequantized model.

Quantized code buffers are named ``*_int4`` / ``*_int8`` (the ONNX edit :func:`int4_initializers`
finds the portable int4 ones by that suffix and stores them as 4-bit ONNX tensors).
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from dsmoe.export.lower import (
    ORT_DOMAIN,
    LoweringError,
    LowerReport,
    _check_activation,
    _lower_mla_std,
    _lower_route_std,
    _route_of,
    apply_lowerings,
    interleave_gate_up,
    moe_dense_std,
)
from dsmoe.export.quant_options import ACCURACY_LEVEL, check_quant_target
from dsmoe.passes.graph import add_buffer_beside, attr
from torch.fx import GraphModule, Node

from dsmoe.contract import GATED_MLP as MLP_CLASS
from dsmoe.contract import ROUTER
from dsmoe.functional import glu
from dsmoe.ops import GATED_MLP, MLA_ATTENTION, MOE, ROUTE
from dsmoe.quant import QuantizedTensor, QuantScheme, quantize
from dsmoe.routing import RoutingSpec

aten = torch.ops.aten
LINEAR = aten.linear.default


# ---- the functions the lowered graph calls (traced by torch.onnx.export) ---------------------

def _matmul_nbits(x, q, s, z, bias, *, N: int, K: int, bits: int, block_size: int):
    """One ``com.microsoft.MatMulNBits``: ``x [.., K]`` → ``[.., N]``."""
    attrs = dict(K=K, N=N, bits=bits, block_size=block_size, accuracy_level=ACCURACY_LEVEL)
    return torch.onnx.ops.symbolic(f"{ORT_DOMAIN}::MatMulNBits", (x, q, s, z, None, bias), attrs, dtype=x.dtype,
                                   shape=(*x.shape[:-1], N), version=1)


def ort_linear_nbits(x, q, s, z, bias, **kw):
    return _matmul_nbits(x, q, s, z, bias, **kw)


def ort_gated_mlp_nbits(x, q1, s1, z1, q2, s2, z2, *, n1: int, n2: int, activation: str, bits: int,
                        blocks: tuple[int, int]):
    h = _matmul_nbits(x, q1, s1, z1, None, N=n1, K=x.shape[-1], bits=bits, block_size=blocks[0])
    return _matmul_nbits(glu(h, activation), q2, s2, z2, None, N=n2, K=n1 // 2, bits=bits, block_size=blocks[1])


def _qmoe_node(x, router_probs, router_weights, q1, s1, z1, q2, s2, z2, *, k: int, normalize: bool, bits: int,
               block_size: int):
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 swiglu_limit=float("inf"), normalize_routing_weights=int(normalize), use_sparse_mixer=0,
                 expert_weight_bits=bits, block_size=block_size, accuracy_level=ACCURACY_LEVEL)
    inputs = (x, router_probs, q1, s1, None, q2, s2, None, None, None, None, z1, z2, None, router_weights)
    return torch.onnx.ops.symbolic(f"{ORT_DOMAIN}::QMoE", inputs, attrs, dtype=x.dtype, shape=x.shape, version=1)


def ort_qmoe_softmax_greedy(x, x_router, w_gate, q1, s1, z1, q2, s2, z2, *, k: int, normalize: bool, scale: float,
                            **kw):
    """Softmax greedy: the op picks the top-k of the logits; ``router_weights`` = softmax·scale."""
    logits = F.linear(x_router.float(), w_gate.float())
    probs = logits.softmax(dim=-1)
    if scale != 1.0 and not normalize:
        probs = probs * scale
    y = _qmoe_node(x, logits.to(x.dtype), probs.to(x.dtype), q1, s1, z1, q2, s2, z2, k=k, normalize=normalize, **kw)
    return y * scale if scale != 1.0 and normalize else y


def ort_qmoe_routed(x, weights, ids, q1, s1, z1, q2, s2, z2, *, num_experts: int, **kw):
    """Any routing: one-hot selection in ``router_probs``, the weights in ``router_weights``."""
    T, K = ids.shape
    sel = torch.zeros((T, num_experts), dtype=x.dtype, device=x.device).scatter(1, ids.long(), 1.0)
    mix = torch.zeros((T, num_experts), dtype=torch.float32, device=x.device).scatter(1, ids.long(), weights.float())
    return _qmoe_node(x, sel, mix.to(x.dtype), q1, s1, z1, q2, s2, z2, k=K, normalize=False, **kw)


def _dequantize_linear(q, s, z, *, axis: int, block_size: int):
    """Standard ONNX blocked ``DequantizeLinear`` (opset 21): ``(q − z) · s`` along ``axis``."""
    inputs = (q, s) if z is None else (q, s, z)
    return torch.onnx.ops.symbolic("DequantizeLinear", inputs, dict(axis=axis, block_size=block_size),
                                   dtype=s.dtype, shape=q.shape, version=21)


def portable_linear_dq(x, q, s, z, bias, *, block_size: int):
    """``x · DQ(codes [K, N])`` (+ bias): the weight is stored transposed, blocks along axis 0."""
    y = torch.matmul(x, _dequantize_linear(q, s, z, axis=0, block_size=block_size))
    return y if bias is None else y + bias


def portable_gated_mlp_dq(x, q1, s1, z1, q2, s2, z2, *, activation: str, blocks: tuple[int, int]):
    h = torch.matmul(x, _dequantize_linear(q1, s1, z1, axis=0, block_size=blocks[0]))
    return torch.matmul(glu(h, activation), _dequantize_linear(q2, s2, z2, axis=0, block_size=blocks[1]))


def portable_moe_dq(x, weights, ids, q1, s1, z1, q2, s2, z2, *, block_size: int):
    """:func:`dsmoe.export.lower.moe_dense_std` on dequantized ``[E, K, N]`` expert weights."""
    w13t = _dequantize_linear(q1, s1, z1, axis=1, block_size=block_size)
    w2t = _dequantize_linear(q2, s2, z2, axis=1, block_size=block_size)
    return moe_dense_std(x, weights, ids, w13t, w2t)


# ---- weights → buffers -------------------------------------------------------------------------

def _ort_buffers(gm: GraphModule, like: Node, name: str, qt: QuantizedTensor, *,
                 blocks: bool = False) -> tuple[Node, Node, Node | None]:
    """Packed codes, fp32 scales and packed zero points (``None`` when symmetric) as buffers of the
    module owning ``like``, in the layout ``QMoE`` takes (codes ``[E, N, K·bits/8]``) or, with
    ``blocks``, ``MatMulNBits`` (``[N, nb, B·bits/8]``)."""
    tag = f"_int{qt.bits}"
    packed = qt.packed()
    if blocks:
        packed = packed.reshape(qt.shape[0], qt.shape[1] // qt.block_size, qt.block_size * qt.bits // 8)
    q = add_buffer_beside(gm, like, f"{name}{tag}", packed)
    s = add_buffer_beside(gm, like, f"{name}_scales", qt.scales)
    zp = qt.packed_zero_points()
    z = None if zp is None else add_buffer_beside(gm, like, f"{name}_zero_points", zp)
    return q, s, z


def _portable_buffers(gm: GraphModule, like: Node, name: str, qt: QuantizedTensor) -> tuple[Node, Node, Node | None]:
    """Codes, scales, zero points with the input dimension moved before the output one
    (``[.., K, N]``, ``[.., nb, N]``), for ``DequantizeLinear`` blocked along that axis: signed
    codes without zero points when symmetric (``q − 2^(bits-1)``), unsigned with them otherwise."""
    t = qt.map_rows(lambda a: a.transpose(-1, -2).contiguous())
    tag = f"_int{qt.bits}"
    if qt.zero_points is None:
        signed = (t.codes.to(torch.int16) - (1 << (qt.bits - 1))).to(torch.int8)
        return add_buffer_beside(gm, like, f"{name}{tag}", signed), add_buffer_beside(gm, like, f"{name}_scales", t.scales), None
    return (add_buffer_beside(gm, like, f"{name}{tag}", t.codes), add_buffer_beside(gm, like, f"{name}_scales", t.scales),
            add_buffer_beside(gm, like, f"{name}_zero_points", t.zero_points))


def _quantize(w: torch.Tensor, scheme: QuantScheme, what: str, block: int | None = None) -> QuantizedTensor:
    block = block or scheme.block_for(w.shape[-1])
    if w.shape[-1] % block:
        raise LoweringError(f"{what}: block size {block} does not divide its input dimension {w.shape[-1]}")
    return quantize(w, scheme.bits, block, symmetric=scheme.symmetric)


def _weight_attr(gm: GraphModule, node: Node, n: Node, what: str) -> torch.Tensor:
    if not isinstance(n, Node) or n.op != "get_attr":
        raise LoweringError(f"{node.name} ({what}): quantized weights must be parameters")
    return attr(gm, n)


# ---- per-op lowerings: (gm, node, report, scheme) → replaces the node ----------------------------

def _lower_moe_qmoe(gm: GraphModule, node: Node, report: LowerReport, scheme: QuantScheme) -> None:
    x, weights, ids, w13_n, w2_n, activation = node.args
    _check_activation(node, activation)
    w13 = _weight_attr(gm, node, w13_n, "dsmoe::moe")
    w2 = _weight_attr(gm, node, w2_n, "dsmoe::moe")
    E = w13.shape[0]
    block = scheme.block_for(w13.shape[-1], w2.shape[-1])  # one block_size attribute for fc1 and fc2
    # rows quantize independently: quantize, then interleave the codes (no fp32 interleaved copy)
    q1 = _ort_buffers(gm, w13_n, "w13_interleaved", _quantize(w13, scheme, node.name, block).map_rows(interleave_gate_up))
    q2 = _ort_buffers(gm, w2_n, "w2", _quantize(w2, scheme, node.name, block))
    kw = dict(bits=scheme.bits, block_size=block)
    route = _route_of(node)
    spec = RoutingSpec.from_node(route) if route is not None else None
    if spec is not None and spec.scoring == "softmax" and not spec.group_limited and route.args[2] is None:
        node.target = ort_qmoe_softmax_greedy
        node.args = (x, route.args[0], route.args[1], *q1, *q2)
        node.kwargs = dict(k=spec.top_k, normalize=spec.norm_topk_prob,
                           scale=float(spec.scaling) if spec.scaled else 1.0, **kw)
        report.count("dsmoe::moe", f"com.microsoft.QMoE int{scheme.bits} (router logits + softmax weights)")
    else:
        node.target = ort_qmoe_routed
        node.args = (x, weights, ids, *q1, *q2)
        node.kwargs = dict(num_experts=E, **kw)
        report.count("dsmoe::moe", f"com.microsoft.QMoE int{scheme.bits} (one-hot selection + router_weights)")


def _gated_mlp_codes(gm: GraphModule, node: Node, scheme: QuantScheme):
    """A ``dsmoe::gated_mlp`` node's input, weight nodes, activation and quantized weights."""
    x, w13_n, w2_n, activation = node.args
    _check_activation(node, activation)
    w13, w2 = _weight_attr(gm, node, w13_n, "dsmoe::gated_mlp"), _weight_attr(gm, node, w2_n, "dsmoe::gated_mlp")
    return x, w13_n, w2_n, activation, _quantize(w13, scheme, node.name), _quantize(w2, scheme, node.name)


def _lower_gated_mlp_nbits(gm: GraphModule, node: Node, report: LowerReport, scheme: QuantScheme) -> None:
    x, w13_n, w2_n, activation, qt1, qt2 = _gated_mlp_codes(gm, node, scheme)
    q1 = _ort_buffers(gm, w13_n, "w13", qt1, blocks=True)
    q2 = _ort_buffers(gm, w2_n, "w2", qt2, blocks=True)
    node.target = ort_gated_mlp_nbits
    node.args = (x, *q1, *q2)
    node.kwargs = dict(n1=qt1.shape[0], n2=qt2.shape[0], activation=activation, bits=scheme.bits,
                       blocks=(qt1.block_size, qt2.block_size))
    report.count("dsmoe::gated_mlp", f"MatMulNBits int{scheme.bits} (gate|up, down)")


def _lower_gated_mlp_dq(gm: GraphModule, node: Node, report: LowerReport, scheme: QuantScheme) -> None:
    x, w13_n, w2_n, activation, qt1, qt2 = _gated_mlp_codes(gm, node, scheme)
    q1 = _portable_buffers(gm, w13_n, "w13", qt1)
    q2 = _portable_buffers(gm, w2_n, "w2", qt2)
    node.target = portable_gated_mlp_dq
    node.args = (x, *q1, *q2)
    node.kwargs = dict(activation=activation, blocks=(qt1.block_size, qt2.block_size))
    report.count("dsmoe::gated_mlp", f"DequantizeLinear int{scheme.bits} + MatMul (gate|up, down)")


def _lower_moe_dq(gm: GraphModule, node: Node, report: LowerReport, scheme: QuantScheme) -> None:
    x, weights, ids, w13_n, w2_n, activation = node.args
    _check_activation(node, activation)
    if activation != "silu":
        raise LoweringError(f"{node.name} (dsmoe::moe): the portable lowering computes SiLU experts only")
    w13, w2 = _weight_attr(gm, node, w13_n, "dsmoe::moe"), _weight_attr(gm, node, w2_n, "dsmoe::moe")
    block = scheme.block_for(w13.shape[-1], w2.shape[-1])  # as the reference quantizes routed experts
    q1 = _portable_buffers(gm, w13_n, "w13", _quantize(w13, scheme, node.name, block))
    q2 = _portable_buffers(gm, w2_n, "w2", _quantize(w2, scheme, node.name, block))
    node.target = portable_moe_dq
    node.args = (x, weights, ids, *q1, *q2)
    node.kwargs = dict(block_size=block)
    report.count("dsmoe::moe", f"DequantizeLinear int{scheme.bits} + dense experts (masked mixing)")


def _classes(node: Node) -> list[str]:
    """The classes of the modules a node was traced in, outer to inner."""
    out = []
    for _, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append(name.split(".")[-1])
    return out


def linear_in_scope(node: Node, scope: str) -> bool:
    """Whether an ``aten.linear`` node is an ``nn.Linear`` the scheme quantizes: any (scope
    ``all``) or one inside a SwiGLU MLP (``experts``); never the router's."""
    classes = _classes(node)
    if not classes or classes[-1] != "Linear" or ROUTER in classes:
        return False
    return scope == "all" or (len(classes) > 1 and classes[-2] == MLP_CLASS)


def _linear(gm: GraphModule, node: Node, report: LowerReport, scheme: QuantScheme, *, ort: bool) -> None:
    if not linear_in_scope(node, scheme.scope):
        return
    x, w_n, *rest = node.args
    bias = rest[0] if rest else None
    w = _weight_attr(gm, node, w_n, "linear")
    qt = _quantize(w, scheme, node.name)
    if ort:
        node.target = ort_linear_nbits
        node.args = (x, *_ort_buffers(gm, w_n, "weight", qt, blocks=True), bias)
        node.kwargs = dict(N=w.shape[0], K=w.shape[1], bits=scheme.bits, block_size=qt.block_size)
        report.count("linear", f"MatMulNBits int{scheme.bits}")
    else:
        node.target = portable_linear_dq
        node.args = (x, *_portable_buffers(gm, w_n, "weight", qt), bias)
        node.kwargs = dict(block_size=qt.block_size)
        report.count("linear", f"DequantizeLinear int{scheme.bits} + MatMul")


QUANT_LOWERINGS = {
    "ort": {MOE: _lower_moe_qmoe, GATED_MLP: _lower_gated_mlp_nbits, ROUTE: _lower_route_std,
            LINEAR: functools.partial(_linear, ort=True), MLA_ATTENTION: _lower_mla_std},
    "portable": {MOE: _lower_moe_dq, GATED_MLP: _lower_gated_mlp_dq, ROUTE: _lower_route_std,
                 LINEAR: functools.partial(_linear, ort=False), MLA_ATTENTION: _lower_mla_std},
}


def lower_quantized(gm: GraphModule, *, target: str, scheme: QuantScheme) -> LowerReport:
    """Like :func:`dsmoe.export.lower`, quantizing weights per ``scheme`` (in place)."""
    check_quant_target(target)
    table = {}
    for op, fn in QUANT_LOWERINGS[target].items():
        table[op] = fn if fn in (_lower_route_std, _lower_mla_std) else functools.partial(fn, scheme=scheme)
    return apply_lowerings(gm, table, LowerReport(target))


def int4_initializers(model: ir.Model) -> int:
    """ONNX edit for the portable target: the ``*_int4`` codes feeding a ``DequantizeLinear`` (the
    exporter writes them one per byte) and their zero points become ``INT4`` (signed) / ``UINT4``
    tensors; returns how many initializers changed."""
    done: set[int] = set()
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        q = node.inputs[0]
        if q is None or q.const_value is None or not q.name.endswith("_int4"):
            continue
        for v in (q, node.inputs[2] if len(node.inputs) > 2 else None):
            if v is None or id(v) in done or v.const_value is None:
                continue
            v.const_value = int4_tensor(v.const_value.numpy(), v.name)
            v.dtype = v.const_value.dtype
            done.add(id(v))
    return len(done)


def int4_tensor(arr: np.ndarray, name: str) -> ir.Tensor:
    """One-per-byte 4-bit codes (int8 → ``INT4``, uint8 → ``UINT4``) as a packed ONNX tensor."""
    return ir.Tensor(arr.astype(ml_dtypes.int4 if arr.dtype == np.int8 else ml_dtypes.uint4), name=name)
