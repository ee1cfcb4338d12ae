"""Architecture facts from the config alone (no weights): layer kinds, expert counts, parameters
total and active per token, bytes per dtype. What ``dsmoe info`` prints and the benchmarks use."""

from __future__ import annotations

from dataclasses import dataclass

from dsmoe.config import DeepseekConfig


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
    attn = H * c.num_attention_heads * c.head_dim * 2 + H * c.num_key_value_heads * c.head_dim * 2
    if c.attention_bias:
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
