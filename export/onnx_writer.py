"""Write a lowered graph as ONNX: :func:`export_module` is the one ONNX export path (opset,
exporter options, ORT fusions, external data, the checker), used for whole decoders
(:func:`to_onnx`) and by the benchmarks for a single MoE layer.

The decoder is one model for prefill and decode, with ONNX Runtime GenAI names:

Inputs ``input_ids [B,S] int64``, ``attention_mask [B,P+S] int64``, ``position_ids [B,S] int64``
and the cache ``past_key_values.{i}.<entry>``; outputs ``logits [B,S,V]`` and
``present.{i}.<entry>`` with P+S slots. The entries are the model's cache layout
(:mod:`dsmoe.cache`): ``key``/``value [B, kv_heads, P, head_dim]`` for multi-head attention,
``latent [B, 1, P, kv_lora_rank + qk_rope_head_dim]`` for MLA. Batch, sequence and past are dynamic.
With ``kv_cache="static"`` past and present are buffers of a dynamic maximum length
``max_sequence`` instead (:mod:`dsmoe.export.static_cache`).
A graph from the ``expose_router`` pass (``dsmoe-export --router-stats``) has more outputs after
those, per MoE layer ``router.{layer}.ids [B·S, K] int32``, ``router.{layer}.weights [B·S, K]
fp32`` and, where the shared experts are separate, ``router.{layer}.routed_norm`` /
``router.{layer}.shared_norm [B·S] fp32``; without it the graph and its outputs are the plain
decoder's. External data is used once the model passes 2 GB; ``onnx.checker`` runs its full check.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.rewriter.onnx_fusions
import torch
from dsmoe.export.static_cache import PAST_AXIS, PRESENT_AXIS, decoder_module
from dsmoe.passes.expose_router import ROUTER_META, ROUTER_PREFIX, router_output_name
from onnx import TensorProto, helper
from onnxscript.rewriter.ort_fusions import optimize_for_ort
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from dsmoe.cache import CacheLayout, cache_layout
from dsmoe.config import DeepseekConfig
from dsmoe.ir import MAX_BATCH, MAX_SEQ, sample_inputs

OPSET = 21
# the export directory: the model, its external data past 2 GB, the model's config, the report
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CONFIG_FILE = "config.json"
REPORT_FILE = "export_report.json"
TWO_GB = 2**31


def io_names(config: DeepseekConfig | CacheLayout | int,
             router: dict[int, list[str]] | None = None) -> tuple[list[str], list[str]]:
    """The decoder's input and output names for a config or cache layout (an ``int``: the layer
    count of a multi-head-attention model, whose cache is ``key``/``value``); ``router``
    (``{layer: [field, ...]}``, as ``expose_router`` records it) appends the router outputs."""
    if isinstance(config, int):
        layout = CacheLayout(config, (("key", 0, 0), ("value", 0, 0)))
    else:
        layout = config if isinstance(config, CacheLayout) else cache_layout(config)
    outputs = ["logits", *layout.output_names()]
    outputs += [router_output_name(layer, f) for layer, fields in (router or {}).items() for f in fields]
    return ["input_ids", "attention_mask", "position_ids", *layout.input_names()], outputs


def to_onnx(gm: GraphModule, path: Path, *, config, dtype: torch.dtype, ort_fusions: bool = False,
            kv_cache: str = "dynamic", edit: Callable | None = None,
            **export_kw) -> tuple[onnx.ModelProto | None, dict[str, int]]:
    """Export the lowered decoder ``gm`` to ``path`` through :func:`export_module`, in the KV-cache
    mode ``kv_cache`` (``dynamic`` or ``static``, see :mod:`dsmoe.export.static_cache`); ``edit``:
    one more edit of the ONNX IR before it is saved (the quantized lowering's int4 tensors),
    ``export_kw``: the streaming exporter's ``should_fold`` and ``save``."""
    module = decoder_module(gm, kv_cache)
    ids, mask, pos, past = sample_inputs(config, batch=2, seq=3, past=5, dtype=dtype)
    B = Dim("batch", min=1, max=MAX_BATCH)
    S = Dim("seq", min=1, max=MAX_SEQ)
    layout = cache_layout(config)
    if kv_cache == "static":  # buffers longer than the filled part (8 of 11 slots)
        past = [tuple(torch.cat([t, t[:, :, :6]], dim=2) for t in entry) for entry in past]
        P = Dim(PAST_AXIS["static"], min=1, max=MAX_SEQ)
    else:
        P = Dim("past", min=0, max=MAX_SEQ)
    dynamic = ({0: B, 1: S}, {0: B, 1: Dim.AUTO}, {0: B, 1: S}, layout.dynamic_shapes(B, P))
    names_in, names_out = io_names(layout, gm.meta.get(ROUTER_META))
    return export_module(module, (ids, mask, pos, past), path, dynamic_shapes=dynamic, input_names=names_in,
                         output_names=names_out, ort_fusions=ort_fusions, **export_kw,
                         edit=lambda model: (_name_dynamic_axes(model, layout, kv_cache),
                                             edit(model) if edit else None))


class _Layer(nn.Module):
    """A lowered one-input graph (a MoE layer: ``x [T, H] -> y [T, H]``) as a module to export."""

    def __init__(self, gm: GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, x):
        return self.gm(x)


def export_layer(gm: GraphModule, x: torch.Tensor, path: Path, *, ort_fusions: bool = False):
    """A lowered single-layer graph ``x [T, H] -> y [T, H]`` through :func:`export_module`, the token
    axis dynamic; inputs ``x``, outputs ``y`` (the benchmarks' and the tests' layer exports)."""
    return export_module(_Layer(gm), (x,), path, dynamic_shapes=({0: Dim("T", min=1, max=MAX_SEQ)},),
                         input_names=["x"], output_names=["y"], ort_fusions=ort_fusions)


def export_module(module: nn.Module, args: tuple, path: Path, *, dynamic_shapes, input_names: list[str],
                  output_names: list[str], ort_fusions: bool = False, edit: Callable | None = None,
                  should_fold: Callable | None = None,
                  save: Callable | None = None) -> tuple[onnx.ModelProto | None, dict[str, int]]:
    """``torch.onnx.export(dynamo=True)`` of ``module`` at :data:`OPSET` to ``path`` (+ external
    data once the initializers pass 2 GB), then ``edit(model)`` on the ONNX IR before saving, and
    ``onnx.checker``'s full check. Returns the proto when it is held in memory (small models),
    else ``None``, and the ORT fusions applied.

    ``ort_fusions`` runs onnxscript's ``optimize_for_ort`` (RMSNorm → SimplifiedLayerNormalization,
    residual + RMSNorm → SkipSimplifiedLayerNormalization, RotaryEmbedding, attention →
    MultiHeadAttention). Kept for the ``ort`` target because it measured faster: on the ``small``
    preset, fp32, 2-core CPU, decode (1 token after 128) 12.7–13.8 ms → 10.6–10.9 ms, prefill of
    128 tokens unchanged (97–110 ms either way), outputs equal to 8e-7 relative.

    The streaming exporter (:mod:`dsmoe.export.stream`) exports a graph whose weights are
    placeholders: ``should_fold(node)`` (onnxscript's hook: False = never fold this node) keeps
    the optimizer from folding them, and ``save(model, path)`` writes the real weights instead of
    the exporter's ``save``.
    """
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" for every exporter run
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     input_names=input_names, output_names=output_names,
                                     opset_version=OPSET, optimize=should_fold is None, verbose=False, report=False)
            if should_fold is not None:  # what optimize=True runs, with the folding hook
                onnxscript.optimizer.optimize_ir(prog.model, should_fold=should_fold)
                onnxscript.rewriter.onnx_fusions.fuse(prog.model)
    finally:
        onnx_log.setLevel(level)
    if edit is not None:
        edit(prog.model)
    fusions: dict[str, int] = {}
    if ort_fusions:
        result = optimize_for_ort(prog.model)
        fused = result[1] if isinstance(result, tuple) else result
        fusions = {k: v for k, v in (fused or {}).items() if v}
    size = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
    large = size >= TWO_GB
    if save is not None:
        save(prog.model, path)
        large = True
    else:
        prog.save(str(path), external_data=large)
    if ort_fusions:
        _expand_unregistered_norms(path)
    onnx.checker.check_model(str(path), full_check=True)
    return (None if large else onnx.load(str(path))), fusions


def _expand_unregistered_norms(path: Path) -> None:
    """Expand the plain RMSNorm fusion's ``SimplifiedLayerNormalization`` back into standard ops.

    ORT registers that op in the *default* ONNX domain, which the ONNX checker (rightly) rejects;
    the fusions that matter (``com.microsoft::SkipSimplifiedLayerNormalization``) are kept, and
    the one norm with no residual (layer 0's input norm) goes back to
    ``x · 1/sqrt(mean(x²) + eps) · weight`` computed in fp32, as the model does.
    """
    model = onnx.load(str(path), load_external_data=False)
    nodes, changed = [], False
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type != "SimplifiedLayerNormalization":
            nodes.append(n)
            continue
        changed = True
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-6)
        x, w, y, p = n.input[0], n.input[1], n.output[0], f"{n.name or n.output[0]}/rms"
        nodes += [
            helper.make_node("Cast", [x], [f"{p}/xf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/xf", f"{p}/xf"], [f"{p}/sq"]),
            helper.make_node("Constant", [], [f"{p}/axes"], value=helper.make_tensor("axes", TensorProto.INT64, [1], [-1])),
            helper.make_node("ReduceMean", [f"{p}/sq", f"{p}/axes"], [f"{p}/ms"], keepdims=1),
            helper.make_node("Constant", [], [f"{p}/eps"], value=helper.make_tensor("eps", TensorProto.FLOAT, [], [eps])),
            helper.make_node("Add", [f"{p}/ms", f"{p}/eps"], [f"{p}/var"]),
            helper.make_node("Sqrt", [f"{p}/var"], [f"{p}/std"]),
            helper.make_node("Reciprocal", [f"{p}/std"], [f"{p}/inv"]),
            helper.make_node("Mul", [f"{p}/xf", f"{p}/inv"], [f"{p}/nf"]),
            helper.make_node("CastLike", [f"{p}/nf", x], [f"{p}/n"]),
            helper.make_node("Mul", [w, f"{p}/n"], [y]),
        ]
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))


def _name_dynamic_axes(model, layout: CacheLayout, kv_cache: str = "dynamic") -> None:
    """Give the dynamic axes readable names (batch, sequence, past_sequence, total_sequence;
    max_sequence for the static cache's buffers)."""
    def set_dims(value, dims):
        shape = value.shape
        if shape is None:
            return
        value.shape = ir.Shape([d if isinstance(d, int) else n for d, n in zip(shape, dims)])

    g = model.graph
    ins = {v.name: v for v in g.inputs}
    outs = {v.name: v for v in g.outputs}
    set_dims(ins["input_ids"], ["batch", "sequence"])
    set_dims(ins["position_ids"], ["batch", "sequence"])
    set_dims(ins["attention_mask"], ["batch", "total_sequence"])
    set_dims(outs["logits"], ["batch", "sequence", None])
    for name in layout.input_names():
        set_dims(ins[name], ["batch", None, PAST_AXIS[kv_cache], None])
    for name in layout.output_names():
        set_dims(outs[name], ["batch", None, PRESENT_AXIS[kv_cache], None])
    for name, value in outs.items():
        if name.startswith(ROUTER_PREFIX):
            set_dims(value, ["batch_x_sequence", None])  # router outputs: one row per token, b·S + s


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """``{"domain::Op" or "Op": count}`` over the main graph and its functions."""
    c: Counter[str] = Counter()
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    for n in nodes:
        c[f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
