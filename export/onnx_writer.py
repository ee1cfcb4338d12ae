"""Write a lowered decoder graph as one ONNX model (prefill and decode, ONNX Runtime GenAI names).

Inputs ``input_ids [B,S] int64``, ``attention_mask [B,P+S] int64``, ``position_ids [B,S] int64``,
``past_key_values.{i}.key/.value [B, kv_heads, P, head_dim]``; outputs ``logits [B,S,V]``,
``present.{i}.key/.value [B, kv_heads, P+S, head_dim]``. Batch, sequence and past are dynamic.
External data is used once the model passes 2 GB; ``onnx.checker`` runs its full check.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from dsmoe.ir import MAX_BATCH, MAX_SEQ, sample_inputs

OPSET = 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TWO_GB = 2**31


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


class _Decoder(nn.Module):
    """The lowered graph with a flat ``(logits, k0, v0, k1, ...)`` output."""

    def __init__(self, gm: GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, present = self.gm(input_ids, attention_mask, position_ids, past_key_values)
        return (logits, *[t for kv in present for t in kv])


def to_onnx(gm: GraphModule, path: Path, *, config, dtype: torch.dtype) -> onnx.ModelProto | None:
    """Export the lowered ``gm`` to ``path`` (+ external data when large); return the proto when
    it is held in memory (small models), else ``None``."""
    args = sample_inputs(config, batch=2, seq=3, past=5, dtype=dtype)
    B = Dim("batch", min=1, max=MAX_BATCH)
    S = Dim("seq", min=1, max=MAX_SEQ)
    P = Dim("past", min=0, max=MAX_SEQ)
    kv = [({0: B, 2: P}, {0: B, 2: P})] * config.num_hidden_layers
    dynamic = ({0: B, 1: S}, {0: B, 1: Dim.AUTO}, {0: B, 1: S}, kv)
    names_in, names_out = io_names(config.num_hidden_layers)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Decoder(gm), (args[0], args[1], args[2], args[3]), dynamo=True,
                                 dynamic_shapes=dynamic, input_names=names_in, output_names=names_out,
                                 opset_version=OPSET, optimize=True, verbose=False, report=False)
    _name_dynamic_axes(prog.model, config.num_hidden_layers)
    size = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
    large = size >= TWO_GB
    prog.save(str(path), external_data=large)
    onnx.checker.check_model(str(path), full_check=True)
    return None if large else onnx.load(str(path))


def _name_dynamic_axes(model, num_layers: int) -> None:
    """Give the dynamic axes readable names (batch, sequence, past_sequence, total_sequence)."""
    import onnx_ir as ir

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
    for i in range(num_layers):
        for kind in ("key", "value"):
            set_dims(ins[f"past_key_values.{i}.{kind}"], ["batch", None, "past_sequence", None])
            set_dims(outs[f"present.{i}.{kind}"], ["batch", None, "total_sequence", None])


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """``{"domain::Op" or "Op": count}`` over the main graph and its functions."""
    c: Counter[str] = Counter()
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    for n in nodes:
        c[f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
