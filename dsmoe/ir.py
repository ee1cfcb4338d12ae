"""IR capture: ``torch.export`` (non-strict) of the reference model to an FX ``GraphModule``.

The captured graph has the decoder signature every backend uses (ONNX Runtime GenAI's)::

    gm(input_ids [B,S] int64, attention_mask [B,P+S] int64, position_ids [B,S] int64,
       past_key_values: one tuple per layer in the cache layout, each [B, heads, P, dim])
       -> (logits [B,S,V], present: the same with P+S slots)

(:mod:`dsmoe.cache`: ``(key, value) [B, kv_heads, P, head_dim]`` for multi-head attention,
``(latent,) [B, 1, P, kv_lora_rank + qk_rope_head_dim]`` for MLA)

with batch, sequence and past length dynamic (past may be 0, sequence may be 1). ATen ops are
kept as exported (``aten.linear`` is not decomposed) and every node keeps its ``nn_module_stack``
metadata, which the passes use to find regions (the routed experts of layer N). The model config
rides along in ``gm.meta["dsmoe_config"]``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from dsmoe.cache import cache_layout
from dsmoe.config import DeepseekConfig

MAX_BATCH, MAX_SEQ = 1024, 1 << 16


CAPTURE_PREFIX = "lm."  # DecoderStep holds the model as ``lm``: graph paths are ``lm.model.layers…``


class DecoderStep(nn.Module):
    """The model with the flat decoder signature (what is captured and exported)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        return self.lm(input_ids, attention_mask, position_ids, past_key_values, use_cache=True)


def sample_inputs(config: DeepseekConfig, *, batch: int = 2, seq: int = 3, past: int = 5, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Seeded decoder inputs ``(input_ids, attention_mask, position_ids, past_key_values)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = cache_layout(config).random(batch, past, g, dtype, device)
    to = lambda t: t.to(device)  # noqa: E731
    return to(ids), to(mask), to(pos), cache


def capture(model: nn.Module) -> GraphModule:
    """Export the model's decoder step with dynamic batch/sequence/past; returns the IR."""
    config: DeepseekConfig = model.config
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    args = sample_inputs(config, batch=2, seq=3, past=5, dtype=dtype, device=device)
    B = Dim("batch", min=1, max=MAX_BATCH)
    S = Dim("seq", min=1, max=MAX_SEQ)
    P = Dim("past", min=0, max=MAX_SEQ)
    kv = cache_layout(config).dynamic_shapes(B, P)
    # attention_mask's length is past+seq: AUTO lets export derive that relation.
    dynamic = ({0: B, 1: S}, {0: B, 1: Dim.AUTO}, {0: B, 1: S}, kv)
    with torch.no_grad():
        ep = torch.export.export(DecoderStep(model), args, dynamic_shapes=dynamic, strict=False)
    # Export's input guards are specialized to the sample's past length; the graph itself is
    # generic (checked by the tests at past 0 and seq 1), so the unlifted module skips them.
    gm = unlift(ep)
    gm.meta["dsmoe_config"] = config
    gm.meta["dsmoe_dtype"] = dtype
    return gm


def unlift(ep: torch.export.ExportedProgram) -> GraphModule:
    """``ep.module()`` without the input guards (torch >= 2.9 has ``check_guards``; older
    versions, such as a GPU machine's preinstalled torch, only check the dynamic ranges)."""
    try:
        return ep.module(check_guards=False)
    except TypeError:
        return ep.module()


# ---- inspection ---------------------------------------------------------------------------

def op_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        return f"{ns}::{name}" if ns != "aten" else f"aten.{name}"
    return getattr(t, "__name__", str(t))


def op_histogram(gm: GraphModule) -> dict[str, int]:
    c = Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def param_bytes(gm: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def node_count(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def nodes_per_layer(gm: GraphModule) -> dict[str, int]:
    c: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        path = module_path(n)
        parts = path.split(".")
        layer = next((f"layer {parts[i + 1]}" for i, p in enumerate(parts[:-1]) if p == "layers"), "other")
        c[layer] += 1
    return dict(sorted(c.items(), key=lambda kv: (kv[0] == "other", int(kv[0].split()[-1]) if kv[0] != "other" else 0)))


def module_path(node: torch.fx.Node) -> str:
    """Innermost module path of a node, without export's ``L__self__``-style prefix."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix(CAPTURE_PREFIX)


@dataclass
class IRSummary:
    nodes: int
    params: int
    ops: dict[str, int]
    per_layer: dict[str, int]


def summary(gm: GraphModule) -> IRSummary:
    return IRSummary(nodes=node_count(gm), params=param_bytes(gm), ops=op_histogram(gm), per_layer=nodes_per_layer(gm))


def timed_capture(model: nn.Module) -> tuple[GraphModule, float]:
    t = time.perf_counter()
    gm = capture(model)
    return gm, time.perf_counter() - t
