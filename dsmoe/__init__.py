"""dsmoe: a compiler for DeepSeek-style Mixture-of-Experts models.

Python API::

    import dsmoe
    model = dsmoe.load("path/to/checkpoint", dtype="float32")   # or "preset:tiny"
    logits = model(input_ids)                                     # [B, S, V]

``passes/``, ``plugins/`` and ``export/`` install as :mod:`dsmoe.passes`, :mod:`dsmoe.plugins`
and :mod:`dsmoe.export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsmoe.config import PRESETS, DeepseekConfig
from dsmoe.errors import ConfigError, DsmoeError
from dsmoe.model import DeepseekForCausalLM, init_weights
from dsmoe import ops as _ops  # noqa: F401  (registers torch.ops.dsmoe.*)

__version__ = "0.1.0"
PRESET_PREFIX = "preset:"

__all__ = ["load", "init_model", "cast_model", "load_config", "DeepseekConfig", "DeepseekForCausalLM",
           "DsmoeError", "PRESETS", "__version__"]


def load_config(source: str | Path, overrides: dict[str, Any] | None = None) -> DeepseekConfig:
    """The config of a checkpoint directory or of ``preset:NAME``, with overrides applied."""
    s = str(source)
    if s.startswith(PRESET_PREFIX):
        return DeepseekConfig.from_name(s[len(PRESET_PREFIX):], **(overrides or {}))
    p = Path(s)
    if not p.exists():
        raise DsmoeError(f"source {s!r} does not exist (a checkpoint directory or preset:NAME)")
    return DeepseekConfig.from_json(p).override(overrides)


def init_model(config: DeepseekConfig, *, seed: int = 0, dtype: str | torch.dtype | None = "float32") -> DeepseekForCausalLM:
    """A random-weight model (deterministic for a seed), in eval mode."""
    from dsmoe.checkpoint import parse_dtype

    model = init_weights(DeepseekForCausalLM(config.validate()), seed)
    return cast_model(model.eval(), parse_dtype(dtype))


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast weights to ``dtype``, keeping the fp32 routing bias fp32."""
    model.to(dtype).requires_grad_(False)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias") or name.endswith("inv_freq"):
            buf.data = buf.data.float()
    return model


def load(source: str | Path, *, dtype: str | torch.dtype | None = None, overrides: dict[str, Any] | None = None,
         seed: int = 0) -> DeepseekForCausalLM:
    """Load a checkpoint directory (safetensors) or build ``preset:NAME`` with random weights.

    ``dtype`` defaults to float32 for presets and to the checkpoint's ``torch_dtype`` otherwise.
    """
    from dsmoe.checkpoint import load_state_dict, parse_dtype

    config = load_config(source, overrides)
    if str(source).startswith(PRESET_PREFIX):
        return init_model(config, seed=seed, dtype=dtype or "float32")
    tdtype = parse_dtype(dtype or config.torch_dtype)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    sd = load_state_dict(source, config, expected, tdtype)
    model.load_state_dict(sd, strict=False, assign=True)
    # non-persistent buffers are not in the checkpoint: rebuild them on the CPU
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            d = mod.inv_freq.shape[0] * 2
            mod.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return cast_model(model.eval(), tdtype)


def _check_presets() -> None:  # import-time sanity: every preset validates
    for name in PRESETS:
        try:
            DeepseekConfig.from_name(name)
        except ConfigError as e:  # pragma: no cover - a broken preset is a bug
            raise RuntimeError(f"preset {name!r} is invalid: {e}") from e


_check_presets()
