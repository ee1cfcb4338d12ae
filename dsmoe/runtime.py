"""Running a model: architecture facts (``dsmoe info``), the fused backend, greedy generation.

A *step function* has the decoder signature of :mod:`dsmoe.ir`:
``step(input_ids, attention_mask, position_ids, past) -> (logits, present)``; the eager model, the
fused graph and the ONNX Runtime session (``dsmoe.export``) all provide one, so
:func:`greedy_generate` is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError

Step = Callable[..., tuple[torch.Tensor, list]]
BACKENDS = ("eager", "fused", "ort")


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


def eager_step(model: torch.nn.Module) -> Step:
    def step(input_ids, attention_mask, position_ids, past):
        return model(input_ids, attention_mask, position_ids, past, use_cache=True)
    return step


def fused_step(model: torch.nn.Module, *, fold_shared_experts: bool = False) -> Step:
    """Capture the model and run the pass pipeline; the fused graph is the step function."""
    from dsmoe.ir import capture
    from dsmoe.passes.context import PassContext
    from dsmoe.passes.pipeline import run_pipeline

    gm, _ = run_pipeline(capture(model), PassContext(fold_shared_experts=fold_shared_experts))
    return gm


def empty_cache(config: DeepseekConfig, batch: int, dtype: torch.dtype, device="cpu") -> list:
    shape = (batch, config.num_key_value_heads, 0, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


@torch.no_grad()
def greedy_generate(step: Step, config: DeepseekConfig, prompt_ids: list[int], max_new_tokens: int, *,
                    dtype: torch.dtype = torch.float32, stop_at_eos: bool = False) -> list[int]:
    """Greedy decoding with the KV cache: one prefill step, then one step per new token."""
    if not prompt_ids:
        raise DsmoeError("the prompt is empty")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise DsmoeError(f"prompt id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    past = empty_cache(config, 1, dtype)
    out: list[int] = []
    pos = 0
    for _ in range(max_new_tokens):
        S = ids.shape[1]
        mask = torch.ones(1, pos + S, dtype=torch.int64)
        position_ids = torch.arange(pos, pos + S, dtype=torch.int64).unsqueeze(0)
        logits, past = step(ids, mask, position_ids, list(past))
        nxt = int(torch.as_tensor(logits)[0, -1].argmax())
        out.append(nxt)
        pos += S
        ids = torch.tensor([[nxt]], dtype=torch.int64)
        if stop_at_eos and nxt == config.eos_token_id:
            break
    return out
