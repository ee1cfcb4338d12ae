"""Rotary position embeddings, once: plain RoPE and YaRN (``rope_scaling`` of type ``yarn``).

The reference model's rotary module and the config's validation both use this module, so a
``rope_scaling`` dict is checked and turned into numbers in one place:

- :func:`yarn_settings` validates a ``rope_scaling`` dict (every field known, every value in
  range) and fills the defaults DeepSeek's code and transformers use;
- :func:`inv_freq` gives the per-pair inverse frequencies ``[d/2]`` and the factor that
  multiplies cos and sin (YaRN's ``attention_factor``, 1.0 for plain RoPE);
- :func:`softmax_scale` gives MLA's softmax scale ``(d_nope + d_rope)^-0.5 · mscale(factor,
  mscale_all_dim)²`` (DeepSeek-V2/V3 ``softmax_scale``; transformers' ``yarn_apply_mscale``).

YaRN (arXiv 2309.00071) as DeepSeek-V2/V3 and transformers 5.x compute it: the frequencies of
pairs that rotate fewer than ``beta_slow`` times over ``original_max_position_embeddings`` are
interpolated (divided by ``factor``), those that rotate more than ``beta_fast`` times are kept,
with a linear ramp between (the ramp's ends floored/ceiled: ``truncate``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsmoe.errors import ConfigError

YARN_FIELDS = ("type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
               "mscale", "mscale_all_dim", "attention_factor", "truncate")


def scaling_type(rope_scaling: dict | None) -> str | None:
    """``None`` for plain RoPE, else the scaling's type (``"yarn"`` …) as the dict spells it."""
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    return None if kind == "default" else kind


def yarn_settings(rope_scaling: dict, max_position_embeddings: int) -> dict[str, Any]:
    """Validated YaRN settings with defaults filled (raises :class:`ConfigError` naming the field).

    Defaults as DeepSeek's code and transformers: ``beta_fast`` 32, ``beta_slow`` 1, ``mscale`` 1,
    ``mscale_all_dim`` 0 (no softmax-scale correction), ``truncate`` true; ``factor`` may be
    omitted when ``original_max_position_embeddings`` is given (then ``max_position_embeddings /
    original``)."""
    unknown = sorted(set(rope_scaling) - set(YARN_FIELDS))
    if unknown:
        raise ConfigError(f"rope_scaling of type 'yarn' has unknown field {unknown[0]!r} "
                          f"(known: {', '.join(YARN_FIELDS[2:])})")
    orig = rope_scaling.get("original_max_position_embeddings")
    if not isinstance(orig, int) or isinstance(orig, bool) or orig < 1:
        raise ConfigError(f"rope_scaling 'yarn' needs original_max_position_embeddings (a positive integer), got {orig!r}")
    factor = rope_scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / orig
    s = {"factor": factor, "original_max_position_embeddings": orig,
         "beta_fast": _given(rope_scaling, "beta_fast", 32), "beta_slow": _given(rope_scaling, "beta_slow", 1),
         "mscale": rope_scaling.get("mscale"), "mscale_all_dim": rope_scaling.get("mscale_all_dim"),
         "attention_factor": rope_scaling.get("attention_factor"), "truncate": rope_scaling.get("truncate", True)}
    for name in ("factor", "beta_fast", "beta_slow"):
        if not _finite(s[name]) or s[name] <= 0:
            raise ConfigError(f"rope_scaling 'yarn' field {name} must be a positive number, got {s[name]!r}")
    if s["factor"] < 1:
        raise ConfigError(f"rope_scaling 'yarn' factor must be >= 1, got {s['factor']!r}")
    if s["beta_fast"] <= s["beta_slow"]:
        raise ConfigError(f"rope_scaling 'yarn' needs beta_fast > beta_slow, got {s['beta_fast']!r} and {s['beta_slow']!r}")
    for name in ("mscale", "mscale_all_dim", "attention_factor"):
        if s[name] is not None and (not _finite(s[name]) or s[name] < 0):
            raise ConfigError(f"rope_scaling 'yarn' field {name} must be a number >= 0, got {s[name]!r}")
    if not isinstance(s["truncate"], bool):
        raise ConfigError(f"rope_scaling 'yarn' field truncate must be true or false, got {s['truncate']!r}")
    return s


def _given(d: dict, name: str, default):
    """``d[name]``, or ``default`` only when it is absent or null (a 0 is a value, checked, never replaced)."""
    v = d.get(name)
    return default if v is None else v


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def yarn_mscale(factor: float, mscale: float | None = 1.0) -> float:
    """``0.1·mscale·ln(factor) + 1`` (1 for factor <= 1): YaRN's attention temperature."""
    if factor <= 1:
        return 1.0
    return 0.1 * (1.0 if mscale is None else mscale) * math.log(factor) + 1.0


def inv_freq(dim: int, theta: float, rope_scaling: dict | None, max_position_embeddings: int,
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, float]:
    """``(inv_freq [dim/2] fp32, attention_factor)``: what multiplies the positions, and what
    multiplies cos and sin (1.0 unless YaRN)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    pos_freqs = theta ** exponents
    extrapolation = 1.0 / pos_freqs
    if scaling_type(rope_scaling) is None:
        return extrapolation, 1.0
    s = yarn_settings(rope_scaling, max_position_embeddings)
    factor = s["factor"]
    interpolation = 1.0 / (factor * pos_freqs)
    low, high = _correction_range(s["beta_fast"], s["beta_slow"], dim, theta, s["original_max_position_embeddings"],
                                  s["truncate"])
    if low == high:
        high += 0.001  # no singularity (as the reference code)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    freq = interpolation * (1.0 - keep) + extrapolation * keep
    attention = s["attention_factor"]
    if attention is None:
        if s["mscale"] and s["mscale_all_dim"]:
            attention = yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
        else:
            attention = yarn_mscale(factor)
    return freq, float(attention)


def _correction_range(beta_fast, beta_slow, dim, theta, original, truncate) -> tuple[float, float]:
    def dim_of(rotations):  # the pair index that rotates `rotations` times over the original context
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def softmax_scale(qk_head_dim: int, rope_scaling: dict | None, max_position_embeddings: int) -> float:
    """MLA's softmax scale: ``qk_head_dim^-0.5``, times ``mscale(factor, mscale_all_dim)²`` under
    YaRN with ``mscale_all_dim`` set (DeepSeek-V2-Lite: 0.707 → ×1.587 at factor 40)."""
    scale = qk_head_dim ** -0.5
    if scaling_type(rope_scaling) is not None:
        s = yarn_settings(rope_scaling, max_position_embeddings)
        if s["mscale_all_dim"]:
            m = yarn_mscale(s["factor"], s["mscale_all_dim"])
            scale = scale * m * m
    return scale
