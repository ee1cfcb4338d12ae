"""GPU implementations of the dsmoe ops: Triton kernels, one source for every path.

- :func:`register_cuda_kernels` makes the Triton kernels the CUDA implementations of
  ``dsmoe::route`` and ``dsmoe::moe`` (``torch.library.register_kernel(..., "cuda", ...)``);
  ``dsmoe::gated_mlp`` keeps torch's own cuBLAS path (its implementation is device-generic).
- :func:`use_triton_kernels` (``"interpret"``) runs the same kernels on CPU tensors under the
  Triton interpreter, for a whole fused graph; the CPU reference is back when the block exits.
- :func:`build_kernels` (``aot.py``) compiles every launch configuration to cubin + PTX + manifest.
- :func:`grouped_mm_moe` is the ``torch._grouped_mm`` baseline the benchmarks compare against.

Nothing here imports triton, cuda-python or CuPy, or touches a GPU, at import time.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from dsmoe import ops
from dsmoe.plugins import _triton
from dsmoe.plugins.aot import build_kernels
from dsmoe.plugins.grouped_mm import grouped_mm_available, grouped_mm_moe
from dsmoe.plugins.moe.launch import moe_triton
from dsmoe.plugins.route.launch import route_triton

route_cuda, moe_cuda = route_triton, moe_triton  # the names the CUDA registration had before

__all__ = [
    "build_kernels",
    "cuda_kernels_status",
    "grouped_mm_available",
    "grouped_mm_moe",
    "moe_cuda",
    "moe_triton",
    "register_cuda_kernels",
    "route_cuda",
    "route_triton",
    "use_triton_kernels",
]

KERNEL_MODES = ("reference", "interpret")
_registered = False
_reason: str | None = "register_cuda_kernels() has not been called"
_cpu_impl: contextvars.ContextVar[str] = contextvars.ContextVar("dsmoe_cpu_kernels", default="reference")
_cpu_installed = False


def cuda_kernels_status() -> tuple[bool, str | None]:
    """``(registered, reason it is not)`` after the last :func:`register_cuda_kernels` call."""
    return _registered, None if _registered else _reason


def register_cuda_kernels() -> bool:
    """Register the Triton kernels as the CUDA kernels of ``dsmoe::route`` and ``dsmoe::moe``; idempotent.

    Returns False (reason in :func:`cuda_kernels_status`) when CUDA or triton is unavailable, or
    when this process runs Triton under the interpreter; the reference then stays the only
    implementation.
    """
    global _registered, _reason
    if _registered:
        return True
    if not torch.cuda.is_available():
        _reason = "torch.cuda.is_available() is False"
        return False
    _reason = _triton.triton_error()
    if _reason is None and _triton.interpreter_active():
        _reason = "TRITON_INTERPRET=1: triton runs under the interpreter in this process"
    if _reason is not None:
        return False
    torch.library.register_kernel("dsmoe::route", "cuda", route_triton)
    torch.library.register_kernel("dsmoe::moe", "cuda", moe_triton)
    _registered, _reason = True, None
    return True


@contextlib.contextmanager
def use_triton_kernels(mode: str = "interpret"):
    """Within the block, ``dsmoe::route`` and ``dsmoe::moe`` on CPU tensors run the Triton kernels.

    ``mode="interpret"``: under the Triton interpreter (``TRITON_INTERPRET=1``), which must be
    chosen before triton is imported — enter the block before capturing a model (torch.export
    imports triton), else RuntimeError. ``mode="reference"``: the CPU reference (a no-op, so a
    caller can pass a flag through). On exit the CPU reference is back; the interpreter stays
    Triton's mode for the rest of the process.

        with use_triton_kernels("interpret"):
            gm = fused_step(model)
            tokens = greedy_generate(gm, model.config, prompt, 16)
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r} (supported: {', '.join(KERNEL_MODES)})")
    if mode == "interpret":
        _triton.enable_interpreter()
        _install_cpu_dispatch()
    token = _cpu_impl.set(mode)
    try:
        yield
    finally:
        _cpu_impl.reset(token)


def _install_cpu_dispatch() -> None:
    """Once: CPU kernels of route/moe that forward to the Triton launchers inside
    :func:`use_triton_kernels` blocks and to the reference everywhere else."""
    global _cpu_installed
    if _cpu_installed:
        return

    def route(*args, **kwargs):
        fn = route_triton if _cpu_impl.get() == "interpret" else ops.route_reference
        return fn(*args, **kwargs)

    def moe(*args, **kwargs):
        return (moe_triton if _cpu_impl.get() == "interpret" else ops.moe_reference)(*args, **kwargs)

    torch.library.register_kernel("dsmoe::route", "cpu", route)
    torch.library.register_kernel("dsmoe::moe", "cpu", moe)
    _cpu_installed = True


def cpu_kernels() -> str:
    """What ``dsmoe::route``/``dsmoe::moe`` run on CPU tensors here: "reference" or "interpret"."""
    return _cpu_impl.get()
