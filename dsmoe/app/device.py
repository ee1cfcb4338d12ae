"""Devices: ``--device`` parsed into one that exists here, and the CUDA kernels it needs."""

from __future__ import annotations

import torch

from dsmoe.errors import DsmoeError
from dsmoe.plugins import cuda_kernels_status, register_cuda_kernels


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``/``cuda``/``cuda:N`` → a device that exists here, or one clear :class:`DsmoeError`."""
    try:
        dev = torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        raise DsmoeError(f"unknown device {name!r} (cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DsmoeError(f"unsupported device {name!r} (cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise DsmoeError(f"--device {name}: no CUDA device here (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DsmoeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def require_cuda_kernels() -> None:
    """Register the dsmoe CUDA kernels or raise :class:`DsmoeError` saying why they cannot be."""
    if not register_cuda_kernels():
        raise DsmoeError(f"the dsmoe CUDA kernels are unavailable: {cuda_kernels_status()[1]}")
