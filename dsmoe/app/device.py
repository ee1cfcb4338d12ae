"""Devices and kernels: ``--device`` parsed into one that exists here, the CUDA kernels it needs,
and ``--kernels`` (what the fused ops run on the CPU)."""

from __future__ import annotations

import contextlib

import torch

from dsmoe.app.choices import KERNELS
from dsmoe.errors import DsmoeError
from dsmoe.plugins import cuda_kernels_status, register_cuda_kernels, use_triton_kernels


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


@contextlib.contextmanager
def cpu_kernels(kernels: str):
    """The context in which a command runs for ``--kernels``: ``reference`` (the CPU ops) or
    ``triton-interpret`` (the Triton kernels under the interpreter: slow, for verification).
    Enter it before capturing a model (Triton's mode is fixed when torch.export imports it)."""
    if kernels not in KERNELS:
        raise DsmoeError(f"unknown --kernels {kernels!r} (choose from {', '.join(KERNELS)})")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(use_triton_kernels(KERNELS[kernels]))
        except RuntimeError as e:
            raise DsmoeError(f"--kernels {kernels}: {e}") from None
        yield


def require_cuda_kernels() -> None:
    """Register the dsmoe CUDA kernels or raise :class:`DsmoeError` saying why they cannot be."""
    if not register_cuda_kernels():
        raise DsmoeError(f"the dsmoe CUDA kernels are unavailable: {cuda_kernels_status()[1]}")
