"""CUDA implementations of the dsmoe ops, built at run time (see ``build.py``).

- :func:`register_cuda_kernels` registers ``dsmoe::route`` and ``dsmoe::moe`` CUDA kernels with
  ``torch.library.register_kernel(..., "cuda", ...)``; ``dsmoe::gated_mlp`` keeps torch's own
  cuBLAS path (its implementation is device-generic).
- :func:`grouped_mm_moe` is the ``torch._grouped_mm`` baseline the benchmarks compare against.

Nothing here imports cuda-python, CuPy or touches a GPU at import time.
"""

from __future__ import annotations

import torch

from dsmoe import ops  # noqa: F401  (defines the ops whose CUDA kernels are registered here)
from dsmoe.plugins import build
from dsmoe.plugins.grouped_mm import grouped_mm_available, grouped_mm_moe
from dsmoe.plugins.moe.launch import moe_cuda
from dsmoe.plugins.route.launch import route_cuda

__all__ = [
    "cuda_kernels_status",
    "grouped_mm_available",
    "grouped_mm_moe",
    "moe_cuda",
    "register_cuda_kernels",
    "route_cuda",
]

_registered = False
_reason: str | None = "register_cuda_kernels() has not been called"


def cuda_kernels_status() -> tuple[bool, str | None]:
    """``(registered, reason it is not)`` after the last :func:`register_cuda_kernels` call."""
    return _registered, None if _registered else _reason


def register_cuda_kernels() -> bool:
    """Register the CUDA kernels of ``dsmoe::route`` and ``dsmoe::moe``; idempotent.

    Returns False (reason in :func:`cuda_kernels_status`) when CUDA or a kernel compiler/loader is
    unavailable; the CPU reference then stays the only implementation.
    """
    global _registered, _reason
    if _registered:
        return True
    if not torch.cuda.is_available():
        _reason = "torch.cuda.is_available() is False"
        return False
    if build._nvrtc() is None and build.find_nvcc() is None:
        _reason = "no CUDA compiler: install cuda-python (NVRTC) or put nvcc on PATH"
        return False
    torch.library.register_kernel("dsmoe::route", "cuda", route_cuda)
    torch.library.register_kernel("dsmoe::moe", "cuda", _moe_kernel(moe_cuda))
    _registered, _reason = True, None
    return True


def _moe_kernel(moe_cuda):
    def moe(x, weights, ids, w13, w2, activation):
        return moe_cuda(x, weights, ids, w13, w2, activation)

    return moe
