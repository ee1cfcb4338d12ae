"""What a quantized export reports: bytes per part of the model, and its accuracy.

Accuracy has two parts, both measured on every quantized export:

1. **exactness** (:func:`dsmoe.export.verify_export` against :func:`dsmoe.quantized.quantized_reference`):
   the ONNX model computes exactly what its quantized weights say, to the fp32 tolerance
   (:data:`dsmoe.dtypes.VERIFY_RTOL`); ``--verify`` fails (exit 1) beyond it.
2. **quality** (:func:`quality`): the ONNX model against the *unquantized* model on N seeded
   prompts — top-1 agreement and mean KL(unquantized ‖ quantized) of the next-token distributions
   at every position, the largest absolute logit error, and per MoE layer the routing drift:
   the fraction of tokens whose chosen expert set changes (measured on the quantized reference,
   which check 1 ties to the ONNX model — the graph does not expose its routing). Reported, not
   a pass/fail.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from dsmoe.export.runner import OrtDecoder
from torch import nn

from dsmoe.cache import cache_layout
from dsmoe.errors import NonFiniteError
from dsmoe.model import MoEGate

PROMPTS, PROMPT_LEN = 8, 32
# parts of the model, by parameter/buffer name (first match wins)
PARTS = [
    ("routed experts", re.compile(r"\.mlp\.experts\.")),
    ("shared experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("router", re.compile(r"\.mlp\.gate\.")),
    ("dense MLP", re.compile(r"\.mlp\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("lm_head", re.compile(r"(^|\.)lm_head\.")),
    ("embeddings", re.compile(r"\.embed_tokens\.")),
    ("norms", re.compile(r"norm\.")),
]


def part_of(name: str) -> str:
    return next((part for part, pat in PARTS if pat.search(name)), "other")


def part_bytes(named_tensors) -> dict[str, int]:
    """``{part: bytes}`` over ``(name, tensor)`` pairs (each storage counted once), plus ``total``."""
    out: dict[str, int] = defaultdict(int)
    seen = set()
    for name, t in named_tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[part_of(name)] += t.numel() * t.element_size()
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    out["total"] = sum(out.values())
    return out


LINEAR_PARTS = ("routed experts", "shared experts", "dense MLP", "attention", "lm_head")


def linear_bytes_per_weight(quant: dict) -> float:
    """Stored bytes per weight of the linears (codes, scales, zero points; fp32 where the scope
    leaves a linear unquantized), from an export report's ``quant``: what a floor counts."""
    q, fp = quant["bytes"], quant["bytes_unquantized"]
    return sum(q.get(p, 0) for p in LINEAR_PARTS) / (sum(fp.get(p, 0) for p in LINEAR_PARTS) / 4)


def module_bytes(module: nn.Module) -> dict[str, int]:
    return part_bytes(list(module.named_parameters()) + list(module.named_buffers()))


def prompts(config, n: int = PROMPTS, length: int = PROMPT_LEN, seed: int = 1234):
    """``(input_ids [n, S], attention_mask, position_ids, empty cache)``: ``n`` seeded prompts of
    ``length`` tokens (fewer when the model's context is shorter), prefilled from an empty cache."""
    g = torch.Generator().manual_seed(seed)
    S = min(length, config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (n, S), generator=g)
    empty = cache_layout(config).empty(n)
    return ids, torch.ones(n, S, dtype=torch.int64), torch.arange(S).expand(n, S).contiguous(), empty


def compare_logits(want: torch.Tensor, got: torch.Tensor) -> dict:
    """Next-token distributions of the unquantized model (``want``) and the export (``got``),
    ``[.., V]`` at every position: top-1 agreement, mean KL(want ‖ got), max |logit error|."""
    want, got = want.double().flatten(0, -2), got.double().flatten(0, -2)
    if not (torch.isfinite(want).all() and torch.isfinite(got).all()):
        raise NonFiniteError("non-finite logits while measuring the quantized export's accuracy")
    lp, lq = want.log_softmax(-1), got.log_softmax(-1)
    return {"positions": want.shape[0], "top1_agreement": float((want.argmax(-1) == got.argmax(-1)).double().mean()),
            "mean_kl": float((lp.exp() * (lp - lq)).sum(-1).mean()), "max_abs_logit_err": float((want - got).abs().max())}


def routing_drift(fp: dict[int, torch.Tensor], q: dict[int, torch.Tensor]) -> dict:
    """Per MoE layer, the fraction of tokens whose chosen expert set differs (``{layer: ids [T,K]}``)."""
    drift = {f"layer {i}": float((fp[i].sort(-1).values != q[i].sort(-1).values).any(dim=-1).double().mean())
             for i in sorted(fp)}
    return {"routing_drift": drift, "routing_drift_mean": sum(drift.values()) / len(drift) if drift else 0.0}


class Routes:
    """Each MoE layer's chosen ids (``MoEGate`` outputs) while a model (or one layer) runs."""

    def __init__(self, model: nn.Module, layers: list[int]):
        gates = [m for m in model.modules() if isinstance(m, MoEGate)]
        self.ids: dict[int, torch.Tensor] = {}
        self.hooks = [g.register_forward_hook(self._hook(i)) for i, g in zip(layers, gates)]

    def _hook(self, i: int):
        def hook(_m, _inp, out):
            self.ids[i] = out[1]
        return hook

    def close(self) -> dict[int, torch.Tensor]:
        for h in self.hooks:
            h.remove()
        return self.ids


@torch.no_grad()
def quality(model: nn.Module, reference: nn.Module, export_dir: str | Path, *, n: int = PROMPTS,
            length: int = PROMPT_LEN, seed: int = 1234) -> dict:
    """The export (and its quantized reference's routing) against the unquantized ``model``."""
    config = model.config
    args = prompts(config, n, length, seed)
    fp_routes, q_routes = Routes(model, config.moe_layers), Routes(reference, config.moe_layers)
    want = model(*args, use_cache=True)[0]
    reference(*args, use_cache=True)
    got = OrtDecoder(export_dir)(*args)[0]
    return {"prompts": n, "prompt_len": args[0].shape[1], "seed": seed, **compare_logits(want, got),
            **routing_drift(fp_routes.close(), q_routes.close())}
