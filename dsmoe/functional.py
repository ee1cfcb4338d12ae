"""The gated-MLP math, once: activations, ``act(gate) ⊙ up``, and the MLP on fused gate|up weights.

``w13 [2I, H]`` (per expert: ``[E, 2I, H]``) holds the gate rows first, then the up rows (the
transformers-v5 fused layout and the op contract). ``dsmoe::gated_mlp``, the CPU ``dsmoe::moe``,
the ONNX lowerings and the ``torch._grouped_mm`` baseline all compute through these functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu}


def act(x: Tensor, activation: str) -> Tensor:
    fn = ACTIVATIONS.get(activation)
    if fn is None:
        raise ValueError(f"unsupported activation {activation!r} (supported: {', '.join(ACTIVATIONS)})")
    return fn(x)


def glu(gu: Tensor, activation: str) -> Tensor:
    """``gu [..., 2I]`` (gate | up) → ``act(gate) ⊙ up [..., I]``."""
    I = gu.shape[-1] // 2
    return act(gu[..., :I], activation) * gu[..., I:]


def gated_mlp(x: Tensor, w13: Tensor, w2: Tensor, activation: str = "silu") -> Tensor:
    """``y = w2·(act(w13[:I]·x) ⊙ w13[I:]·x)``: ``x [T,H], w13 [2I,H], w2 [H,I]`` → ``y [T,H]``."""
    return F.linear(glu(F.linear(x, w13), activation), w2)


def stack_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """``gate [I,H], up [I,H]`` → ``w13 [2I,H]`` (gate rows, then up rows)."""
    return torch.cat([gate, up], dim=0)
