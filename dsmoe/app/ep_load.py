"""One rank's model: the shared parts and only this rank's routed experts, read from the checkpoint.

The safetensors shards are memory-mapped (:func:`dsmoe.checkpoint.read_tensors`) and the other
ranks' expert keys are skipped, so their bytes are never read; those experts get a zero-stride
placeholder (one zero element ``expand``-ed to the weight's shape, no memory) so that the model
still captures with all E experts, and :func:`dsmoe.passes.shard_experts.shard_experts` keeps
only the rank's. A preset (``preset:NAME``) is drawn whole (its random weights come from one
generator), then its foreign experts are released the same way.

Known cost: ``outline_moe`` stacks every layer's E experts (placeholders included) before the
shard step drops the foreign ones, so the peak during graph building holds one zero-filled
``[E, 3·I, H]`` stack per MoE layer; the steady state (what the rank serves with) is shared parts +
its experts (measured by ``benchmarks/ep_bench.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

import dsmoe
from dsmoe.checkpoint import load_state_dict, mtp_layers, read_tensors, shard_plan, unstack_experts
from dsmoe.contract import HF_STACKED, LAYER_KEY
from dsmoe.dtypes import parse_dtype
from dsmoe.errors import CheckpointError
from dsmoe.fp8 import dequantize_state_dict
from dsmoe.model import DeepseekForCausalLM, rebuild_rotary

EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def foreign(placement, rank: int):
    """``key -> bool``: whether a checkpoint key is a routed expert that rank ``rank`` does not hold."""
    mine = {layer: set(a[rank]) for layer, a in placement.layers.items()}

    def test(key: str) -> bool:
        m = EXPERT_KEY.match(key)
        return bool(m) and int(m.group(1)) in mine and int(m.group(2)) not in mine[int(m.group(1))]
    return test


def load_rank_model(source: str, placement, rank: int, *, dtype=None, overrides=None, device="cpu",
                    allow_nonfinite: bool = False) -> tuple[DeepseekForCausalLM, dict]:
    """The model for ``rank`` (foreign experts as placeholders) and what was read: ``{"read_bytes",
    "skipped_keys"}``."""
    skip = foreign(placement, rank)
    if dsmoe.is_preset(source):
        model = dsmoe.load(source, dtype=dtype, overrides=overrides, device=device)
        n = _release(model, skip)
        return model, {"read_bytes": 0, "skipped_keys": n}
    config = dsmoe.load_config(source, overrides)
    tdtype = parse_dtype(dtype or config.torch_dtype)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if any(HF_STACKED.match(k) for k in _keys(source)) or config.fp8_block:
        # stacked (transformers v5) or fp8 checkpoints: read whole, then release (noted in the docs)
        sd = load_state_dict(source, config, expected, tdtype, check_finite=not allow_nonfinite)
        read = sum(t.numel() * t.element_size() for t in sd.values())
        sd = {k: v for k, v in sd.items() if not skip(k)}
    else:
        mtp = set(mtp_layers(config))
        sd, read = {}, 0
        for key, t in read_tensors(Path(source), tdtype, check_finite=not allow_nonfinite,
                                   skip=lambda k: skip(k) or _layer(k) in mtp):
            for k, v in (unstack_experts(key, t, config).items() if HF_STACKED.match(key) else [(key, t)]):
                sd[k] = v
                read += v.numel() * v.element_size()
        sd = dequantize_state_dict(sd, config.fp8_block, tdtype)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v.to(device) for k, v in sd.items()}  # each tensor moved once; placeholders made where they live
    held = [k for k in expected if skip(k)]
    for k in held:
        sd[k] = torch.zeros((), dtype=tdtype, device=device).expand(expected[k])
    missing = sorted(set(expected) - set(sd) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"missing key {missing[0]}")
    model.load_state_dict(sd, strict=False, assign=True)
    rebuild_rotary(model)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = dsmoe.cast_model(model.eval(), tdtype).to(device)  # already there: placeholders stay views
    return model, {"read_bytes": read, "skipped_keys": len(held)}


def _release(model: torch.nn.Module, skip) -> int:
    n = 0
    for name, p in model.named_parameters():
        if skip(name):
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
            n += 1
    return n


def _layer(key: str) -> int | None:
    m = LAYER_KEY.match(key)
    return int(m.group(1)) if m else None


def _keys(source: str) -> list[str]:
    out = []
    for f, keys in shard_plan(Path(source)):
        if keys is not None:
            out.extend(keys)
        else:
            with safe_open(str(f), framework="pt") as sf:
                out.extend(sf.keys())
    return out
