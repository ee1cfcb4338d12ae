"""Exactness of an ``ort`` quantized export, op by op: every ``MatMulNBits`` and ``QMoE`` node
computes exactly what its quantized weights say.

Why op by op: at ``accuracy_level`` 4 the kernels quantize their *activations* to int8 per block
(:func:`dsmoe.quant.quantize_activations`), a step function. ONNX Runtime's fused norms and
attention round differently from torch in the last bit, and once in a while such a bit moves an
activation across a rounding boundary, so end to end the export and the emulating reference
differ by one activation code here and there (0.015 of the largest logit on the 16B-wide 2-layer
model, 0.024 on 5 layers, however exact each op is). So the check runs the export with every quantized node's inputs and outputs exposed,
recomputes each node from its own initializers (unpacked by :mod:`dsmoe.quant`) on ONNX Runtime's
inputs with dsmoe's reference math — :func:`dsmoe.quant.qlinear`, top-k routing, SwiGLU — and
holds each to the fp32 tolerance, allowing one activation step for each input code within
:data:`LAST_BIT` of a rounding boundary (the kernel's scaling and the reference's differ in the last
bit). A QMoE node also quantizes its *inner* activation (fc1 → fc2),
which no output exposes: where the reference's value of it lies within 5e-3 of a code's rounding
boundary, either rounding is allowed (the bound :func:`_undecided` adds exactly that), the rest
of the error must stay within the tolerance (without the allowance: 2.8e-4 on a 16B MoE layer,
with it 1.3e-6). That reads the weights from the export itself, so the end-to-end difference to
the reference model (whose weights dsmoe quantized from the source) must also stay within
:data:`E2E_RTOL` — a wrong weight or layout is far outside it. (The ``portable`` target's
standard ops keep fp32 activations: it is checked end to end at the fp32 tolerance.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from dsmoe.export.onnx_writer import MODEL_FILE
from dsmoe.export.quant_options import ACCURACY_LEVEL
from dsmoe.export.runner import session
from onnx import helper, numpy_helper

from dsmoe.cache import cache_layout
from dsmoe.dtypes import VERIFY_RTOL
from dsmoe.ir import sample_inputs
from dsmoe.quant import QuantizedTensor, qlinear, quantize_activations, unpack

QUANT_OPS = ("MatMulNBits", "QMoE")
# End to end, the export may differ from the emulating reference by the odd activation code (see
# above): up to this much of the largest logit. Wrong weights or a wrong layout land far outside
# (O(1)); the op-by-op check is what holds the kernels to the fp32 tolerance.
E2E_RTOL = 0.1


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Initializers:
    """Initializers by name, read one at a time (external data included) on demand."""

    def __init__(self, model: onnx.ModelProto, base: Path):
        self.protos = {t.name: t for t in model.graph.initializer}
        self.base = str(base)

    def __contains__(self, name: str) -> bool:
        return name in self.protos

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(self.protos[name], base_dir=self.base)))


def _qt(codes_packed: torch.Tensor, scales: torch.Tensor, zp_packed: torch.Tensor | None, *, bits: int,
        block_size: int, K: int) -> QuantizedTensor:
    """``[.., N, K·bits/8]`` packed codes (+ packed zero points) → a :class:`QuantizedTensor`."""
    codes = unpack(codes_packed, bits, K)
    nb = K // block_size
    zp = None if zp_packed is None else unpack(zp_packed, bits, nb)
    return QuantizedTensor(codes, scales.float(), zp, bits, block_size)


def _matmul_nbits(node, a: dict, vals: dict, inits: _Initializers) -> tuple[torch.Tensor, torch.Tensor | float]:
    """The node recomputed, and its allowance: the input's activation codes that sit within
    :data:`LAST_BIT` of a rounding boundary may round either way."""
    x = vals[node.input[0]]
    N, K, bits, B = a["N"], a["K"], a["bits"], a["block_size"]
    codes = inits[node.input[1]].reshape(N, -1)
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    bias = inits[node.input[5]] if len(node.input) > 5 and node.input[5] else None
    qt = _qt(codes, inits[node.input[2]].reshape(N, -1), zp, bits=bits, block_size=B, K=K)
    act = a.get("accuracy_level", 0) == ACCURACY_LEVEL
    y = qlinear(x, qt, bias, act_quant=act)
    return y, (_undecided(x.reshape(-1, K), qt, LAST_BIT).reshape(y.shape) if act else 0.0)


def _swiglu(h: torch.Tensor, a: dict) -> torch.Tensor:
    g, u = h[..., 0::2], h[..., 1::2]  # swiglu_fusion=1: interleaved rows
    limit = a.get("swiglu_limit", float("inf"))
    g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return g * torch.sigmoid(a.get("activation_alpha", 1.0) * g) * (u + a.get("activation_beta", 0.0))


# An inner (fc1 → fc2) activation this close to a rounding boundary, in code units, may round either
# way: ONNX Runtime's SwiGLU (its SiLU's exp approximation, fc1's summation order) differs from
# torch's by up to ~3e-3 codes, measured on the 28-layer 16B model (1e-3 left a 8.8e-4 residual
# on one of 27 QMoE nodes there; 3e-3 none). About 1% of the codes get the allowance.
AMBIGUOUS = 5e-3
# An input activation (exposed: the reference sees ONNX Runtime's own value) this close to a
# boundary, in code units, may still round either way: the kernel scales by 1/scale in its own
# vector order where the reference multiplies by 127/max|x|, a last-bit difference of the scaled
# value (fp32 at 127 is 7.6e-6 apart). Measured on MatMulNBits with K = 10944 (the 16B dense
# down projection): residuals of 1.2e-4–1.7e-4 without it, at the fp32 level (≤ 1.6e-6) from 1e-5.
LAST_BIT = 1e-4


def _undecided(a: torch.Tensor, w2: QuantizedTensor, ambiguous: float = AMBIGUOUS) -> torch.Tensor:
    """``[t, N]``: how far W2·a can move when each activation code the reference cannot decide
    (``a``'s int8 value within :data:`AMBIGUOUS` of a rounding boundary) goes one step either way:
    Σ over those codes of one activation step times |ŵ| (the fc1 → fc2 activation is quantized
    inside QMoE, where ONNX Runtime's fc1 sum may differ from the reference's in the last bit)."""
    q, sa = quantize_activations(a, w2.block_size)  # [t, nb, B], [t, nb]
    amax = a.abs().reshape(q.shape).amax(-1, keepdim=True)
    v = a.float().reshape(q.shape) * torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    near = ((v - v.floor() - 0.5).abs() < ambiguous).float() * sa.unsqueeze(-1)  # one step where undecided
    return near.flatten(1) @ w2.dequantize().abs().T


def _qmoe(node, a: dict, vals: dict, inits: _Initializers, *, bound: bool = False):
    name = lambda i: node.input[i] if len(node.input) > i and node.input[i] else None  # noqa: E731
    x, probs = vals[name(0)], vals[name(1)].float()
    bits, B, k = a.get("expert_weight_bits", 4), a["block_size"], a["k"]
    H = x.shape[-1]
    w1 = _qt(inits[name(2)], inits[name(3)], inits[name(11)] if name(11) else None, bits=bits, block_size=B, K=H)
    I = w1.shape[1] // 2
    w2 = _qt(inits[name(5)], inits[name(6)], inits[name(12)] if name(12) else None, bits=bits, block_size=B, K=I)
    act = bits == 8 or a.get("accuracy_level", 0) == ACCURACY_LEVEL  # block-wise int8 experts: always
    ids = probs.topk(k, dim=-1).indices
    mix = vals[name(14)].float() if name(14) else probs.softmax(-1)
    w = mix.gather(1, ids)
    if a.get("normalize_routing_weights", 0):
        w = w / w.sum(-1, keepdim=True)
    y = torch.zeros(x.shape, dtype=torch.float32)
    slack = torch.zeros(x.shape, dtype=torch.float32)
    x2 = x.reshape(-1, H)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        h = qlinear(x2[tok], _expert(w1, e), act_quant=act)
        mid, ws = _swiglu(h, a), w[tok, slot].unsqueeze(-1)
        y.view(-1, H).index_add_(0, tok, qlinear(mid, _expert(w2, e), act_quant=act) * ws)
        if bound and act:
            slack.view(-1, H).index_add_(0, tok, _undecided(mid, _expert(w2, e)) * ws.abs())
    return (y.to(x.dtype), slack) if bound else y.to(x.dtype)


def _expert(q: QuantizedTensor, e: int) -> QuantizedTensor:
    zp = None if q.zero_points is None else q.zero_points[e]
    return QuantizedTensor(q.codes[e], q.scales[e], zp, q.bits, q.block_size)


def check_quantized_ops(export_dir: str | Path, feeds: list[dict]) -> dict:
    """Run the export on each feed (``{input name: ndarray}``) with every quantized node's inputs
    and outputs exposed; recompute each node; the worst relative error over nodes and feeds."""
    d = Path(export_dir)
    model = onnx.load(str(d / MODEL_FILE), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in QUANT_OPS]
    inits = _Initializers(model, d)
    wanted = {v for n in nodes for v in [*n.input, *n.output] if v and v not in inits}
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(v) for v in sorted(wanted - have))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=".verify-", dir=d)  # beside model.onnx.data
    os.close(fd)
    try:
        onnx.save(model, tmp)
        sess = session(tmp, optimize=False)
        names = [o.name for o in sess.get_outputs()]
        tol, worst, per_op = VERIFY_RTOL[torch.float32], 0.0, {op: 0 for op in QUANT_OPS}
        where = ""
        for feed in feeds:
            vals = {n: torch.from_numpy(v) for n, v in zip(names, sess.run(names, feed))}
            for node in nodes:
                a = _attrs(node)
                if node.op_type == "MatMulNBits":
                    ref, slack = _matmul_nbits(node, a, vals, inits)
                else:
                    ref, slack = _qmoe(node, a, vals, inits, bound=True)
                got = vals[node.output[0]]
                scale = ref.float().abs().max().clamp_min(1e-12)
                # what is left after the undecided codes' worst case, relative to the output
                err = float(((ref.float() - got.float()).abs() - slack).clamp_min(0).max() / scale)
                per_op[node.op_type] += 1
                if not err <= worst:
                    worst, where = err, f"{node.op_type} {node.name or node.output[0]}"
        del sess
    finally:
        os.unlink(tmp)
    passed = worst <= tol
    return {"passed": passed, "tolerance": tol, "rel_err": worst, "worst_node": where,
            "nodes_checked": {k: v // max(len(feeds), 1) for k, v in per_op.items()}, "feeds": len(feeds),
            "summary": f"every quantized op vs dsmoe's reference on ONNX Runtime's own inputs: worst relative error "
                       f"{worst:.3g} ({'<=' if passed else '>'} {tol:g}) at {where}"}


def with_end_to_end(ops: dict, end_to_end: dict) -> dict:
    """Check 1 of an ``ort`` export: every op at the fp32 tolerance and the whole within E2E_RTOL."""
    e2e_ok = bool(end_to_end["rel_err"] <= E2E_RTOL)
    passed = ops["passed"] and e2e_ok
    summary = (f"{ops['summary']}; end to end vs the quantized reference: relative {end_to_end['rel_err']:.3g} "
               f"({'<=' if e2e_ok else '>'} {E2E_RTOL:g})")
    return {**ops, "passed": passed, "summary": summary, "end_to_end_rel_err": end_to_end["rel_err"],
            "end_to_end_tolerance": E2E_RTOL, "max_abs_err": end_to_end.get("max_abs_err")}


def op_check_feeds(config) -> list[dict]:
    """A prefill (2 × 16 tokens) and a decode step (2 × 1 token after 6 cached): both kernel paths."""
    return [feeds_of(sample_inputs(config, batch=2, seq=16, past=0, seed=7), config),
            feeds_of(sample_inputs(config, batch=2, seq=1, past=6, seed=8), config)]


def feeds_of(args, config, *, dtype=np.float32) -> dict:
    """Decoder inputs (torch) → an ONNX Runtime feed (the cache named as ``config``'s layout)."""
    ids, mask, pos, past = args
    feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64),
            "position_ids": pos.numpy().astype(np.int64)}
    names = cache_layout(config).input_names()
    feed.update(zip(names, (t.numpy().astype(dtype) for entry in past for t in entry), strict=True))
    return feed
