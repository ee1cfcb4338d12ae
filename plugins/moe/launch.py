"""Launcher of the ``dsmoe::moe`` Triton kernels (``kernels.py``).

``moe_triton(x [T,H], weights [T,K] fp32, ids [T,K] int, w13 [E,2I,H], w2 [E,H,I], activation)``
→ ``y [T,H]`` in x's dtype. CUDA tensors run the compiled kernels, CPU tensors the Triton
interpreter (see :func:`dsmoe.plugins.use_triton_kernels`). No host sync: the row-block count
is bounded from the shapes (``config.MB``) and surplus blocks exit at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsmoe.plugins import _triton
from dsmoe.plugins.moe.config import moe_config, validate_moe

TORCH_DTYPE = {"i32": torch.int32, "fp32": torch.float32}


def moe_triton(x: Tensor, weights: Tensor, ids: Tensor, w13: Tensor, w2: Tensor, activation: str) -> Tensor:
    """Triton ``dsmoe::moe`` (same signature as the op). Ids outside [0, E) contribute nothing."""
    # 1. validate; operands contiguous, ids int32, weights fp32
    T, H, E, K, I = validate_moe(tuple(x.shape), tuple(weights.shape), tuple(ids.shape), tuple(w13.shape),
                                 tuple(w2.shape), x.dtype, activation)
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"dsmoe::moe: expert weights must be in x's dtype {x.dtype}, got {w13.dtype}, {w2.dtype}")
    if any(t.device != x.device for t in (weights, ids, w13, w2)):
        raise ValueError("dsmoe::moe: all operands must be on one device")
    interpreted, arch = _triton.run_mode(x.device)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    ids = ids.to(torch.int32).contiguous()
    weights = weights.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    if T == 0 or H == 0:
        return y
    if I == 0:
        return y.zero_()
    # 2. configuration and workspace (formulas shared with the AOT manifest)
    cfg = moe_config(T, E, K, H, I, x.dtype, arch)
    sizes = dict(T=T, H=H, E=E, K=K, I=I)
    ws = {}
    for b in cfg.buffers:
        n = _triton.evaluate(b.numel, **sizes)
        dt = x.dtype if b.type == "{x}" else TORCH_DTYPE[b.type]
        ws[b.name] = (torch.zeros if b.zeroed else torch.empty)(n, dtype=dt, device=x.device)
    mb = _triton.evaluate(cfg.mb, **sizes)
    values = dict(ws, x=x, w13=w13, w2=w2, ids=ids, weights=weights, y=y, T=T, H=H, E=E, K=K, I=I,
                  P=T * K, MB=mb)
    mod = _triton.kernels("moe")
    f32_dot = dict(F32_DOT=_triton.dot_in_fp32(x.dtype, interpreted))
    # 3. align: per-expert counts and tickets, padded starts + block -> expert, pairs grouped by expert
    cfg.count.run(mod, sizes, values, {})
    cfg.offsets.run(mod, sizes, values, {})
    cfg.scatter.run(mod, sizes, values, {})
    # 4. gate/up GEMM with SwiGLU in the epilogue -> act [rows, I]
    cfg.gate_up.run(mod, sizes, values, f32_dot)
    # 5. down GEMM, routing weight in the epilogue -> out [P, H] fp32
    cfg.down.run(mod, sizes, values, f32_dot)
    # 6. combine over K in fp32 -> y
    cfg.combine.run(mod, sizes, values, {})
    return y
