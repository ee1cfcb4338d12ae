"""Architecture facts from the config alone (no weights): layer kinds, expert counts, parameters
total and active per token, bytes per dtype, KV-cache bytes per token. What ``dsmoe info`` prints
and the benchmarks use."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from dsmoe.cache import cache_layout, expanded_values_per_token
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError


@dataclass
class Architecture:
    layers: int
    dense_layers: list[int]
    moe_layers: list[int]
    routed_experts: int
    shared_experts: int
    experts_per_token: int
    params_total: int
    params_active: int
    params_per_expert: int

    def bytes(self, n: int) -> dict[str, int]:
        return {"fp32": 4 * n, "fp16/bf16": 2 * n, "fp8/int8": n}


def architecture(c: DeepseekConfig) -> Architecture:
    """Parameter counts from the config alone (no weights needed), per the spec's layout."""
    H, V = c.hidden_size, c.vocab_size
    attn = mla_attention_params(c) if c.is_mla else (
        H * c.num_attention_heads * c.head_dim * 2 + H * c.num_key_value_heads * c.head_dim * 2)
    if c.attention_bias and not c.is_mla:
        attn += 2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
    dense_mlp = 3 * H * c.intermediate_size
    expert = 3 * H * c.moe_intermediate_size if c.has_moe else 0
    shared = 3 * H * c.shared_intermediate_size
    router = (c.n_routed_experts or 0) * H
    moe_layers = c.moe_layers
    dense_layers = [i for i in range(c.num_hidden_layers) if i not in moe_layers]
    per_layer_common = attn + 2 * H
    total = V * H * (1 if c.tie_word_embeddings else 2) + H
    total += c.num_hidden_layers * per_layer_common + len(dense_layers) * dense_mlp
    total += len(moe_layers) * ((c.n_routed_experts or 0) * expert + shared + router)
    inactive = len(moe_layers) * ((c.n_routed_experts or 0) - (c.num_experts_per_tok or 0)) * expert
    return Architecture(c.num_hidden_layers, dense_layers, moe_layers, c.n_routed_experts or 0,
                        c.n_shared_experts or 0, c.num_experts_per_tok or 0, total, total - inactive, expert)


def mla_attention_params(c: DeepseekConfig) -> int:
    """One MLA attention block: q (``q_proj``, or ``q_a_proj`` + norm + ``q_b_proj``),
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj`` (+ biases)."""
    H, nh, R = c.hidden_size, c.num_attention_heads, c.kv_lora_rank
    q_out = nh * c.qk_head_dim
    q = H * q_out if c.q_lora_rank is None else H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * q_out
    n = q + H * (R + c.qk_rope_head_dim) + R + R * nh * (c.qk_nope_head_dim + c.v_head_dim) + nh * c.v_head_dim * H
    if c.attention_bias:
        n += (c.q_lora_rank or 0) + R + c.qk_rope_head_dim + H
    return n


def kv_cache_report(c: DeepseekConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """KV-cache size per token in ``dtype``, as the artifacts keep it (``latent`` for MLA,
    ``key``/``value`` for MHA) and as an expanded per-head key/value cache would (MLA:
    ``heads · (qk_nope + qk_rope + v)`` values per layer)."""
    layout = cache_layout(c)
    size = torch.empty((), dtype=dtype).element_size()
    kept, expanded = layout.values_per_token(), expanded_values_per_token(c)
    return {"entries": list(layout.names), "values_per_token_per_layer": kept,
            "bytes_per_token": layout.bytes_per_token(size),
            "expanded_values_per_token_per_layer": expanded,
            "expanded_bytes_per_token": c.num_hidden_layers * expanded * size,
            "expanded_over_kept": expanded / kept, "dtype": str(dtype).removeprefix("torch.")}


def attention_summary(c: DeepseekConfig) -> str:
    """One line on the attention: MHA heads, or the MLA dims and the RoPE scaling."""
    rs = c.rope_scaling
    yarn = (f"; YaRN factor {rs.get('factor'):g} over {rs.get('original_max_position_embeddings')} positions"
            if rs else "; plain RoPE")
    if not c.is_mla:
        return f"multi-head, {c.num_attention_heads} heads ({c.num_key_value_heads} key/value), head_dim {c.head_dim}"
    q = "q_proj" if c.q_lora_rank is None else f"q_lora_rank {c.q_lora_rank}"
    return (f"MLA, {c.num_attention_heads} heads, {q}, kv_lora_rank {c.kv_lora_rank}, qk {c.qk_nope_head_dim} nope + "
            f"{c.qk_rope_head_dim} rope ({'interleaved' if c.rope_interleave else 'rotate-half'}), v {c.v_head_dim}{yarn}")


def notes(c: DeepseekConfig) -> list[str]:
    """What a loader does that the architecture alone does not show (skipped MTP layers, fp8)."""
    out = [f"{name}: {what}" for name, what in c.defaults_taken.items()]
    n, L = c.num_nextn_predict_layers, c.num_hidden_layers
    if c.is_mla and n:
        layers = ", ".join(f"model.layers.{i}" for i in range(L, L + n))
        out.append(f"{n} multi-token-prediction layer{'s' if n > 1 else ''} ({layers}) left out: not used for inference")
    if c.fp8_block:
        r, k = c.fp8_block
        out.append(f"fp8 e4m3 weights with {r}×{k} block scales, dequantized on load")
    return out


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: on a GPU what CUDA reports free; on the
    CPU the least of the available RAM, the cgroup's remaining limit and the address-space rlimit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    limits = [psutil.virtual_memory().available]
    try:
        cg = Path("/sys/fs/cgroup")
        raw = (cg / "memory.max").read_text().strip()
        if raw != "max":
            limits.append(int(raw) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - psutil.Process().memory_info().vms)
    return max(min(limits), 0)


def check_fits(config: DeepseekConfig, dtype: torch.dtype, device: torch.device, *, what: str = "the model") -> None:
    """Refuse (one line, with the numbers) to build a model whose weights cannot fit in memory."""
    need = architecture(config).params_total * dtype.itemsize
    have = available_memory(device)
    if need > have:
        raise DsmoeError(f"{what} needs {need / 2**30:,.1f} GiB for its weights in {str(dtype).removeprefix('torch.')} "
                         f"on {device}, but only {have / 2**30:,.1f} GiB are available (try a smaller preset, "
                         "--set num_hidden_layers=N, or a 16-bit --dtype)")
