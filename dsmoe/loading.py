"""Loading and building models: a checkpoint directory or ``preset:NAME`` → the reference model.

Re-exported by :mod:`dsmoe` (``dsmoe.load``, ``dsmoe.init_model``, …), which imports this module
only when one of them is first used, so that ``import dsmoe`` (and ``dsmoe --help``) stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsmoe import PRESET_PREFIX, is_preset, log
from dsmoe import ops as _ops  # noqa: F401  (registers torch.ops.dsmoe.*)
from dsmoe.architecture import check_fits
from dsmoe.checkpoint import load_state_dict
from dsmoe.config import PRESETS, DeepseekConfig
from dsmoe.contract import FP32_KEY, INV_FREQ
from dsmoe.dtypes import parse_dtype
from dsmoe.errors import ConfigError, DsmoeError
from dsmoe.model import DeepseekForCausalLM, init_weights, rebuild_rotary


def load_config(source: str | Path, overrides: dict[str, Any] | None = None) -> DeepseekConfig:
    """The config of a checkpoint directory or of ``preset:NAME``, with overrides applied."""
    s = str(source)
    if is_preset(s):
        return DeepseekConfig.from_name(s[len(PRESET_PREFIX):], **(overrides or {}))
    p = Path(s)
    if not p.exists():
        raise DsmoeError(f"source {s!r} does not exist (a checkpoint directory or preset:NAME)")
    return DeepseekConfig.from_json(p).override(overrides)


def init_model(config: DeepseekConfig, *, seed: int = 0, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device = "cpu") -> DeepseekForCausalLM:
    """A random-weight model (deterministic for a seed and device), in eval mode.

    The model is allocated on ``device`` in ``dtype`` and filled in place (the 16B preset is 33 GB
    in bf16: building it in fp32 first would not fit a GPU).
    """
    config.validate()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise DsmoeError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    tdtype = parse_dtype(dtype)
    check_fits(config, tdtype, torch.device(device), what=f"a random {config.num_hidden_layers}-layer model")
    with torch.device("meta"):
        model = DeepseekForCausalLM(config).to(tdtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives each module its own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    rebuild_rotary(model)
    return cast_model(init_weights(model, seed).eval(), tdtype)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast weights to ``dtype``, keeping the fp32 routing bias fp32."""
    model.to(dtype).requires_grad_(False)
    for name, buf in model.named_buffers():
        if FP32_KEY.search(name) or name.endswith(INV_FREQ):
            buf.data = buf.data.float()
    return model


def load(source: str | Path, *, dtype: str | torch.dtype | None = None, overrides: dict[str, Any] | None = None,
         seed: int = 0, device: str | torch.device = "cpu", allow_nonfinite: bool = False) -> DeepseekForCausalLM:
    """Load a checkpoint directory (safetensors) or build ``preset:NAME`` with random weights.

    ``dtype`` defaults to float32 for presets and to the checkpoint's ``torch_dtype`` otherwise;
    ``device`` is where the model ends up (checkpoints are read on the CPU, then moved). A weight
    holding NaN or Inf is refused (naming it) unless ``allow_nonfinite``.
    """
    config = load_config(source, overrides)
    if is_preset(source):
        return init_model(config, seed=seed, dtype=dtype or "float32", device=device)
    tdtype = parse_dtype(dtype or config.torch_dtype)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    notes: list[str] = []
    sd = load_state_dict(source, config, expected, tdtype, check_finite=not allow_nonfinite, notes=notes)
    for note in notes:
        log.info(note)
    model.load_state_dict(sd, strict=False, assign=True)
    model.load_notes = notes
    rebuild_rotary(model)  # non-persistent: not in the checkpoint
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return cast_model(model.eval(), tdtype).to(device)


def _check_presets() -> None:  # import-time sanity: every preset validates
    assert PRESETS
    for name in PRESETS:
        try:
            DeepseekConfig.from_name(name)
        except ConfigError as e:  # pragma: no cover - a broken preset is a bug
            raise RuntimeError(f"preset {name!r} is invalid: {e}") from e


_check_presets()
