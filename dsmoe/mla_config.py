"""The config side of DeepSeek-V2/V3 (``model_type`` ``deepseek_v2`` / ``deepseek_v3``): what an MLA
``config.json`` must hold and how it is checked. :class:`dsmoe.config.DeepseekConfig` calls these
(its fields ``q_lora_rank``, ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
``v_head_dim``, ``rope_interleave``, ``num_nextn_predict_layers``, ``quantization_config``).

- :func:`mla_from_dict`: every MLA field spelled out (transformers' defaults for them differ
  between V2 and V3, so none is assumed), plus what the family implies when left out (a
  transformers V3 config omits ``scoring_func`` / ``topk_method``: sigmoid, noaux_tc).
- :func:`validate_mla`: positive dims, an even rope part, ``head_dim`` / ``qk_head_dim`` (what
  transformers writes: ``head_dim = qk_rope_head_dim``) consistent with the dims, one key/value
  head per query head, ``rope_scaling`` null or YaRN (:mod:`dsmoe.rope`), fp8 settings.
- :func:`read_rope_parameters`: transformers v5's ``rope_parameters`` into ``rope_theta`` /
  ``rope_scaling``.
"""

from __future__ import annotations

import json
from typing import Any

from dsmoe import rope
from dsmoe.errors import ConfigError

MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")  # Multi-head Latent Attention (dsmoe/mla.py)
# MLA fields a deepseek_v2/v3 config.json must spell out (q_lora_rank may be null: V2-Lite)
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# fields only MLA configs use (left out of an MHA config.json while at their defaults)
MLA_ONLY_FIELDS = (*MLA_FIELDS, "rope_interleave", "num_nextn_predict_layers", "quantization_config")
# what a family implies when its config.json leaves it out
IMPLIED = {"deepseek_v2": {"scoring_func": "softmax"},
           "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}}
FP8_FIELDS = ("quant_method", "fmt", "activation_scheme", "weight_block_size")
# RMSNorm epsilon of q_a_layernorm / kv_a_layernorm: DeepSeek's code and transformers build them
# with the norm's default 1e-6, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def mla_from_dict(d: dict[str, Any]) -> None:
    """Check a deepseek_v2/v3 config dict for the MLA fields; fill the family's implied routing."""
    missing = [k for k in MLA_FIELDS if k not in d]
    if missing:
        raise ConfigError(f"{d['model_type']} config is missing MLA field {missing[0]!r}")
    for k, v in IMPLIED[d["model_type"]].items():
        d.setdefault(k, v)


def validate_mha_only(c) -> None:
    """A multi-head-attention (``deepseek``) config carries no MLA-only settings."""
    if c.rope_scaling not in (None, {}):
        raise ConfigError(f"unsupported feature rope_scaling={json.dumps(c.rope_scaling)} (model_type "
                          f"{c.model_type!r} supports plain RoPE only; YaRN is for deepseek_v2/deepseek_v3)")
    for name in MLA_FIELDS:
        if getattr(c, name) is not None:
            raise ConfigError(f"{name} is set, but model_type {c.model_type!r} uses multi-head attention "
                              "(MLA fields need model_type deepseek_v2 or deepseek_v3)")
    if c.quantization_config:
        raise ConfigError("quantization_config is supported for deepseek_v2/deepseek_v3 fp8 checkpoints only")


def validate_mla(c) -> None:
    """Raise :class:`ConfigError` (one line, names the field) unless the MLA settings are usable."""
    for name in MLA_FIELDS[1:]:
        _positive_int(c, name)
    if c.q_lora_rank is not None:
        _positive_int(c, "q_lora_rank")
    if c.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim {c.qk_rope_head_dim} must be even for rotary embeddings")
    if c.num_key_value_heads != c.num_attention_heads:
        raise ConfigError(f"inconsistent head counts: MLA expands keys and values for every head, but "
                          f"num_key_value_heads {c.num_key_value_heads} != num_attention_heads {c.num_attention_heads}")
    for name, want in (("head_dim", c.qk_rope_head_dim), ("qk_head_dim", c.qk_head_dim)):
        got = c.extra.get(name)
        if got is not None and got != want:
            raise ConfigError(f"inconsistent head dims: {name} {got!r}, but qk_nope_head_dim {c.qk_nope_head_dim} "
                              f"and qk_rope_head_dim {c.qk_rope_head_dim} make it {want}")
    if c.extra.get("mlp_bias"):
        raise ConfigError("unsupported feature mlp_bias=true (DeepSeek MLPs have no biases)")
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, dict):
        raise ConfigError(f"rope_scaling must be an object (or null), got {c.rope_scaling!r}")
    kind = rope.scaling_type(c.rope_scaling)
    if kind not in (None, "yarn"):
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: yarn, or null for plain RoPE)")
    if kind == "yarn":
        rope.yarn_settings(c.rope_scaling, c.max_position_embeddings)
    if not isinstance(c.rope_interleave, bool):
        raise ConfigError(f"rope_interleave must be true or false, got {c.rope_interleave!r}")
    n = c.num_nextn_predict_layers
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"num_nextn_predict_layers must be an integer >= 0, got {n!r}")
    if c.quantization_config:
        validate_fp8(c.quantization_config)


def validate_fp8(q) -> None:
    """fp8 e4m3 weights with block scales (DeepSeek-V3's ``quantization_config``)."""
    if not isinstance(q, dict):
        raise ConfigError(f"quantization_config must be an object, got {q!r}")
    unknown = sorted(set(q) - set(FP8_FIELDS))
    if unknown:
        raise ConfigError(f"quantization_config has unknown field {unknown[0]!r} (known: {', '.join(FP8_FIELDS)})")
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"unsupported quantization quant_method={q.get('quant_method')!r} fmt={q.get('fmt')!r} "
                          "(supported: fp8 e4m3 with block scales, dequantized on load)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config weight_block_size must be two positive integers, got {block!r}")


def yarn(factor: float, original: int, **extra: float) -> dict[str, Any]:
    """A YaRN ``rope_scaling`` as DeepSeek's configs spell it (for the presets)."""
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, **extra}


def _positive_int(c, name: str) -> None:
    v = getattr(c, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
