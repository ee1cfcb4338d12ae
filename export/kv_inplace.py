"""Keys and values written in place: an in-memory rewrite of a dynamic-cache export's attention
to ONNX Runtime's ``GroupQueryAttention`` with past and present in one buffer.

A dynamic-cache export computes, per layer and step, ``present = Concat(past, new, axis=2)`` and
attends over ``present``: every decode step copies the layer's whole cache into a fresh tensor
(and allocates it). At a 2048-token context on the 4-layer DeepSeekMoE-16B cut that copy is most
of a layer's attention time (5.3 ms vs 1.5 ms per layer measured on the AMD EPYC VM).
``GroupQueryAttention`` takes the past as a buffer of capacity ``M`` and, when ``present`` is
bound to the same memory, writes the new slots into it at ``seqlens_k + 1 - S`` and attends over
the first ``total_sequence_length`` slots — no copy. :class:`dsmoe.export.OrtDecoder` binds the
buffers (``kv="inplace"``), the graph keeps its inputs: ``seqlens_k`` (``T - 1`` for every row)
and ``total_sequence_length`` (``T``) are computed from ``attention_mask``'s width ``T``, and the
export's own additive mask (causal + padding) goes in as ``attention_bias``, so left-padded rows
attend to what they did before.

Only the pattern the exporter writes is rewritten (``MultiHeadAttention(q, Concat(past.key, k),
Concat(past.value, v), '', '', bias)``, after :func:`dsmoe.export.runner.attention_kv_bnsh`, the
concatenations being graph outputs read by nothing else); a graph where any layer differs is
refused whole (:class:`KvInplaceUnsupported`), so a caller falls back to the copying path.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from dsmoe.errors import DsmoeError
from dsmoe.export.static_cache import PAST_AXIS

_PREFIX = "dsmoe_gqa"
_MHA_ATTRS = {"num_heads", "scale"}  # attributes with a GroupQueryAttention equivalent; any other: refused


class KvInplaceUnsupported(DsmoeError):
    """The graph's attention is not the pattern the in-place rewrite knows."""


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attention_gqa_inplace(m: onnx.ModelProto, kv_heads: int) -> int:
    """Rewrite every layer's ``Concat`` + ``MultiHeadAttention`` into one ``GroupQueryAttention``
    (``kv_num_heads=kv_heads``) whose ``present.{i}.key/value`` outputs may share the past inputs'
    buffers. ``m`` is changed in place; returns the number of layers rewritten. Raises
    :class:`KvInplaceUnsupported` (``m`` untouched) unless every attention matches."""
    g = m.graph
    why = _cache_why_not(g)
    if why:
        raise KvInplaceUnsupported(why)
    prod = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    inputs = {i.name for i in g.input}
    plans = []
    for node in g.node:
        if node.op_type != "MultiHeadAttention":
            continue
        why = _why_not(node, prod, readers, outputs, inputs)
        if why:
            raise KvInplaceUnsupported(f"{node.name}: {why}")
        plans.append(node)
    if not plans:
        raise KvInplaceUnsupported("the graph has no MultiHeadAttention over a concatenated cache")
    if "attention_mask" not in inputs or "input_ids" not in inputs:
        raise KvInplaceUnsupported("the graph has no attention_mask or input_ids input")
    pasts = {i for n in plans for c in (prod[n.input[1]], prod[n.input[2]]) for i in c.input[:1]}
    lengths = []  # Shape(past)[2:3] → the past length read from the inputs (the buffers are longer)
    for n in g.node:
        for i in n.input:
            if i not in pasts or n.op_type == "Concat":
                continue
            a = _attrs(n)
            if n.op_type != "Shape" or len(n.input) != 1:
                raise KvInplaceUnsupported(f"{n.name} ({n.op_type}) reads the past cache {i}")
            start, end = (v + 4 if v < 0 else min(v, 4) for v in (a.get("start", 0), a.get("end", 4)))  # rank 4
            if end <= 2 or start >= 3:
                continue  # batch, heads or head_dim: the same in a buffer
            if (start, end) != (2, 3):
                raise KvInplaceUnsupported(f"{n.name} reads the past length of {i} with other axes")
            lengths.append(n)

    shared = [
        helper.make_node("Shape", ["attention_mask"], [f"{_PREFIX}.mask_shape"], name=f"{_PREFIX}/mask_shape"),
        helper.make_node("Gather", [f"{_PREFIX}.mask_shape", f"{_PREFIX}.one"], [f"{_PREFIX}.T64"], axis=0,
                         name=f"{_PREFIX}/T"),
        helper.make_node("Gather", [f"{_PREFIX}.mask_shape", f"{_PREFIX}.zero1"], [f"{_PREFIX}.B64"], axis=0,
                         name=f"{_PREFIX}/B"),
        helper.make_node("Cast", [f"{_PREFIX}.T64"], [f"{_PREFIX}.total_sequence_length"], to=TensorProto.INT32,
                         name=f"{_PREFIX}/total"),
        helper.make_node("Sub", [f"{_PREFIX}.total_sequence_length", f"{_PREFIX}.one32"], [f"{_PREFIX}.last"],
                         name=f"{_PREFIX}/last"),
        helper.make_node("Expand", [f"{_PREFIX}.last", f"{_PREFIX}.B64"], [f"{_PREFIX}.seqlens_k"],
                         name=f"{_PREFIX}/seqlens_k"),
        helper.make_node("Shape", ["attention_mask"], [f"{_PREFIX}.T1"], start=1, end=2, name=f"{_PREFIX}/T1"),
        helper.make_node("Shape", ["input_ids"], [f"{_PREFIX}.S1"], start=1, end=2, name=f"{_PREFIX}/S1"),
        helper.make_node("Sub", [f"{_PREFIX}.T1", f"{_PREFIX}.S1"], [f"{_PREFIX}.past_len"], name=f"{_PREFIX}/P"),
    ]
    g.initializer.extend([
        helper.make_tensor(f"{_PREFIX}.one", TensorProto.INT64, [], [1]),
        helper.make_tensor(f"{_PREFIX}.zero1", TensorProto.INT64, [1], [0]),
        helper.make_tensor(f"{_PREFIX}.one32", TensorProto.INT32, [], [1]),
        helper.make_tensor(f"{_PREFIX}.bsh", TensorProto.INT64, [3], [0, 0, -1]),
    ])
    for n in lengths:
        g.node.insert(list(g.node).index(n), helper.make_node("Identity", [f"{_PREFIX}.past_len"], list(n.output),
                                                              name=f"{n.name}.{_PREFIX}"))
        g.node.remove(n)
    for k, n in enumerate(shared):
        g.node.insert(k, n)

    for node in plans:
        cat_k, cat_v = prod[node.input[1]], prod[node.input[2]]
        new = []
        for tag, cat in (("key", cat_k), ("value", cat_v)):
            bsnh = f"{node.name}.{_PREFIX}.{tag}_bsnh"
            flat = f"{node.name}.{_PREFIX}.{tag}"
            new += [helper.make_node("Transpose", [cat.input[1]], [bsnh], perm=[0, 2, 1, 3], name=f"{bsnh}/T"),
                    helper.make_node("Reshape", [bsnh, f"{_PREFIX}.bsh"], [flat], name=f"{flat}/R")]
        a = _attrs(node)
        kw = {"num_heads": a["num_heads"], "kv_num_heads": kv_heads}
        if "scale" in a:
            kw["scale"] = a["scale"]
        gqa = helper.make_node(
            "GroupQueryAttention",
            [node.input[0], new[1].output[0], new[3].output[0], cat_k.input[0], cat_v.input[0],
             f"{_PREFIX}.seqlens_k", f"{_PREFIX}.total_sequence_length", "", "", "", node.input[5]],
            [node.output[0], cat_k.output[0], cat_v.output[0]], domain="com.microsoft", name=f"{node.name}.gqa", **kw)
        at = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate([*new, gqa]):
            g.node.insert(at + k, n)
        g.node.remove(cat_k)
        g.node.remove(cat_v)
    return len(plans)


def _cache_why_not(g) -> str:
    """Why the graph's cache inputs cannot be written in place ("" when they can)."""
    first = next((i for i in g.input if i.name.startswith("past_key_values.")), None)
    if first is None:
        return "the graph has no cache inputs"
    t = first.type.tensor_type
    if t.shape.dim[2].dim_param == PAST_AXIS["static"]:
        return "a static-cache export already writes its buffers in place"
    if t.elem_type != TensorProto.FLOAT:
        return "only fp32 caches (ONNX Runtime's GroupQueryAttention is slow on CPU with fp16 ones)"
    return ""


def _why_not(node, prod, readers, outputs, inputs) -> str:
    a = _attrs(node)
    if set(a) - _MHA_ATTRS:
        return f"attributes {sorted(set(a) - _MHA_ATTRS)} have no GroupQueryAttention equivalent"
    if len(node.input) < 3 or any(node.input[i] for i in (3, 4) if i < len(node.input)) or len(node.input) > 6:
        return "inputs other than query, key, value and attention_bias"
    if len(node.input) < 6 or not node.input[5]:
        return "no attention_bias (GroupQueryAttention would add a causal mask the graph does not have)"
    if len(node.output) != 1:
        return "it returns more than the attention output"
    for i in (1, 2):
        cat = prod.get(node.input[i])
        if cat is None or cat.op_type != "Concat" or _attrs(cat).get("axis") not in (2, -2) or len(cat.input) != 2:
            return "keys/values are not Concat(past, new, axis=2)"
        if cat.input[0] not in inputs or cat.output[0] not in outputs:
            return "the concatenation is not past input → present output"
        if readers.get(cat.output[0], 0) != 1:
            return f"{cat.output[0]} is read by more than the attention"
    return ""
