"""The KV cache, described once: what each layer keeps per token, under which names, in which shape.

Everything that makes, feeds or names a cache — the model, :func:`dsmoe.ir.sample_inputs` and
capture, generation (``empty_cache``, the static-cache decoder), the ONNX input/output names and
dynamic axes, the ONNX Runtime runner, export verification — goes through :func:`cache_layout`.
A cache is a list with one tuple per layer, one tensor per entry of the layout, each
``[B, heads, P, dim]`` (P: cached tokens).

The two layouts, the artifacts' contract:

- multi-head attention (``deepseek``): per layer ``key`` and ``value`` ``[B, kv_heads, P, head_dim]``;
  ONNX ``past_key_values.{i}.key`` / ``.value`` → ``present.{i}.key`` / ``.value``;
- MLA (``deepseek_v2`` / ``deepseek_v3``): per layer ``latent`` ``[B, 1, P, kv_lora_rank + d_rope]``;
  ONNX ``past_key_values.{i}.latent`` → ``present.{i}.latent``.

The MLA latent of a token is ``[c_KV ‖ k_rope]``: ``c_KV = kv_a_layernorm(kv_a_proj_with_mqa(x)[:R])``
(R = ``kv_lora_rank``, after the norm) then the key's rope part shared by all heads, RoPE applied,
in rotate-half order (for interleaved checkpoints: the even then the odd dims of each head, the
order DeepSeek's code rotates in). One "head" per layer: DeepSeek-V2-Lite keeps 512 + 64 values
per token and layer where caching the expanded keys and values would take 16 × (192 + 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsmoe.config import DeepseekConfig

PAST, PRESENT = "past_key_values", "present"
KEY, VALUE, LATENT = "key", "value", "latent"


@dataclass(frozen=True)
class CacheLayout:
    """``layers`` × one tensor per entry ``(name, heads, dim)``, each ``[B, heads, P, dim]``."""

    layers: int
    entries: tuple[tuple[str, int, int], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.entries)

    def shapes(self, batch: int, length: int) -> tuple[tuple[int, int, int, int], ...]:
        return tuple((batch, heads, length, dim) for _, heads, dim in self.entries)

    def empty(self, batch: int, dtype: torch.dtype = torch.float32, device="cpu", length: int = 0) -> list[tuple]:
        """A zero cache of ``length`` slots (0: the cache before the first step)."""
        return [tuple(torch.zeros(s, dtype=dtype, device=device) for s in self.shapes(batch, length))
                for _ in range(self.layers)]

    def random(self, batch: int, length: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
               device="cpu") -> list[tuple]:
        """Seeded normal values (drawn layer by layer, entry by entry, on the CPU)."""
        return [tuple(torch.randn(s, generator=generator).to(device=device, dtype=dtype)
                      for s in self.shapes(batch, length)) for _ in range(self.layers)]

    def input_names(self) -> list[str]:
        return [f"{PAST}.{i}.{name}" for i in range(self.layers) for name in self.names]

    def output_names(self) -> list[str]:
        return [f"{PRESENT}.{i}.{name}" for i in range(self.layers) for name in self.names]

    def unflatten(self, flat) -> list[tuple]:
        """Flat ``[l0e0, l0e1, l1e0, …]`` (the ONNX order) → one tuple per layer."""
        n = len(self.entries)
        return [tuple(flat[i * n:(i + 1) * n]) for i in range(self.layers)]

    def dynamic_shapes(self, batch, past) -> list[tuple[dict, ...]]:
        """``torch.export`` dynamic shapes of a cache argument: batch (dim 0) and past (dim 2)."""
        return [tuple({0: batch, 2: past} for _ in self.entries) for _ in range(self.layers)]

    def values_per_token(self) -> int:
        """Cached values per token and layer."""
        return sum(heads * dim for _, heads, dim in self.entries)

    def bytes_per_token(self, itemsize: int) -> int:
        """Cache bytes per token, all layers."""
        return self.layers * self.values_per_token() * itemsize


def cache_layout(config: DeepseekConfig) -> CacheLayout:
    """The cache of a model: ``latent`` for MLA, ``key``/``value`` for multi-head attention."""
    if config.is_mla:
        return CacheLayout(config.num_hidden_layers, ((LATENT, 1, config.kv_lora_rank + config.qk_rope_head_dim),))
    kv, d = config.num_key_value_heads, config.head_dim
    return CacheLayout(config.num_hidden_layers, ((KEY, kv, d), (VALUE, kv, d)))


def expanded_values_per_token(config: DeepseekConfig) -> int:
    """Values per token and layer if keys and values were cached per head (what an MHA-style cache of
    the same attention would hold): MLA ``heads · (qk_nope + qk_rope + v)``; MHA its own cache."""
    if config.is_mla:
        return config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    return cache_layout(config).values_per_token()
