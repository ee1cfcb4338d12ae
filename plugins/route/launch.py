"""Launcher of the ``dsmoe::route`` Triton kernels (``kernels.py``).

``route_triton(x [T,H], w_gate [E,H], bias [E]?, **attrs) -> (weights [T,K] fp32, ids [T,K] int32)``
with the attributes of ``dsmoe::route``; CUDA tensors run the compiled kernels, CPU tensors the
Triton interpreter (see :func:`dsmoe.plugins.use_triton_kernels`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsmoe.plugins import _triton
from dsmoe.plugins.route.config import route_config, validate_route


def route_triton(x: Tensor, w_gate: Tensor, bias: Tensor | None, scoring: str, topk_method: str,
                 top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float,
                 scale_when: str) -> tuple[Tensor, Tensor]:
    """Triton ``dsmoe::route`` (same signature as the op)."""
    # 1. shapes, dtypes and attributes
    if x.dim() != 2 or w_gate.dim() != 2 or x.shape[1] != w_gate.shape[1]:
        raise ValueError(f"dsmoe::route: want x [T,H] and w_gate [E,H], got {tuple(x.shape)} and {tuple(w_gate.shape)}")
    T, H = x.shape
    E = w_gate.shape[0]
    a = validate_route(T, H, E, scoring=scoring, topk_method=topk_method, top_k=top_k, n_group=n_group,
                       topk_group=topk_group, norm_topk_prob=norm_topk_prob, scaling=scaling, scale_when=scale_when)
    if x.dtype not in _triton.TYPE_OF_DTYPE or w_gate.dtype not in _triton.TYPE_OF_DTYPE:
        raise ValueError(f"dsmoe::route: unsupported dtypes x {x.dtype}, w_gate {w_gate.dtype} "
                         "(supported: float32, bfloat16, float16)")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"dsmoe::route: bias must be [E]={E}, got {tuple(bias.shape)}")
    if w_gate.device != x.device:
        raise ValueError(f"dsmoe::route: x on {x.device} but w_gate on {w_gate.device}")
    interpreted, arch = _triton.run_mode(x.device)
    if x.dtype != w_gate.dtype:  # logits = x.float() @ w_gate.float()ᵀ: one dtype for the GEMM
        x, w_gate = x.float(), w_gate.float()
    x, w_gate = x.contiguous(), w_gate.contiguous()
    bias = (torch.zeros(E, dtype=torch.float32, device=x.device) if bias is None
            else bias.to(device=x.device, dtype=torch.float32).contiguous())
    weights = torch.empty((T, top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=x.device)
    if T == 0:
        return weights, ids
    # 2. configuration (one function for this launcher and the AOT build)
    cfg = route_config(T, E, top_k, H, x.dtype, arch)
    mod = _triton.kernels("route")
    sizes = dict(T=T, H=H, E=E, K=top_k)
    # 3. logits [T,E] fp32 (the workspace the configuration lists)
    (buf,) = cfg.buffers
    logits = torch.empty(_triton.evaluate(buf.numel, T=T, E=E), dtype=torch.float32, device=x.device)
    cfg.logits.run(mod, sizes, dict(x=x, w=w_gate, logits=logits, T=T, H=H, E=E),
                   dict(F32_DOT=_triton.dot_in_fp32(x.dtype, interpreted)))
    # 4. scores, group limit, top-K, normalize, scale
    cfg.select.run(mod, sizes, dict(logits=logits, bias=bias, weights=weights, ids=ids, T=T, E=E, K=a.K,
                                    n_group=a.n_group, topk_group=a.topk_group, scoring=a.scoring,
                                    method=a.method, normalize=a.normalize, scale=a.scale, scaling=a.scaling), {})
    return weights, ids
