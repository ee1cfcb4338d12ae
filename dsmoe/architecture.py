"""Architecture facts from the config alone (no weights): layer kinds, expert counts, parameters
total and active per token, bytes per dtype. What ``dsmoe info`` prints and the benchmarks use."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

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
