"""Baseline MoE on PyTorch's own grouped GEMM (``torch._grouped_mm``), for benchmarks.

Sort the T·K (token, slot) pairs by expert, cumulative per-expert offsets, one grouped gate/up
GEMM, SwiGLU, one grouped down GEMM, routing weight, combine over K in fp32. No host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_mm_available() -> bool:
    """Whether the installed torch has ``torch._grouped_mm`` (CPU support: torch 2.13 has it)."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm_moe(x: Tensor, weights: Tensor, ids: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """``x [T,H], weights [T,K], ids [T,K], w13 [E,2I,H], w2 [E,H,I]`` → ``y [T,H]`` (x's dtype).

    Same math as ``dsmoe::moe`` with silu; ids must lie in ``[0, E)`` (not checked: no sync).
    """
    if not grouped_mm_available():
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    T, H = x.shape
    K = ids.shape[1]
    E, twoI, _ = w13.shape
    I = twoI // 2
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    # offs[e] = end of expert e's rows = #pairs with id <= e (searchsorted: no host sync)
    experts = torch.arange(E, device=x.device, dtype=flat.dtype)
    offs = torch.searchsorted(flat.index_select(0, order), experts, right=True).to(torch.int32)
    tok = order // K
    xs = x.index_select(0, tok)                                        # [P,H], grouped by expert
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)         # [P,2I]
    h = (F.silu(gu[:, :I]) * gu[:, I:]).contiguous()                   # [P,I]
    out = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)          # [P,H]
    out = out.float() * weights.reshape(-1).float().index_select(0, order).unsqueeze(-1)
    y = torch.zeros((T, H), dtype=torch.float32, device=x.device).index_add_(0, tok, out)
    return y.to(x.dtype)
