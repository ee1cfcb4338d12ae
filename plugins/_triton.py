"""Triton import, run mode and the launch description shared by the launchers and the AOT build.

Triton fixes its mode when it is first imported: with ``TRITON_INTERPRET=1`` in the environment
every ``@triton.jit`` function, triton.language's own included, becomes an interpreted function
that runs on CPU tensors (numpy underneath); without it they compile for a GPU. The two cannot be
mixed in one process, and ``torch._dynamo`` (so ``torch.export``) imports triton, so
:func:`enable_interpreter` must run before that. Nothing here imports triton at import time.

A kernel launch is described once, as data (:class:`Launch`): kernel name, ordered typed
arguments, constexprs, warps/stages and the grid as formulas of the runtime sizes. The PyTorch
launchers evaluate exactly those formulas; ``aot.py`` writes them into the manifest.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType

import torch

TYPE_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_OF_TYPE = {v: k for k, v in TYPE_OF_DTYPE.items()}
INTERPRETER_ARCH = 90  # the interpreter runs the configurations chosen for sm_90


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def evaluate(formula: str, **sizes: int) -> int:
    """Value of a size formula (``"cdiv(T*K, 1024)"``) for the runtime sizes (T, H, E, K, I)."""
    env = {"cdiv": cdiv, "min": min, "max": max, **sizes}
    return int(eval(formula, {"__builtins__": {}}, env))


def triton_error() -> str | None:
    """Why triton cannot be imported here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'dsmoe[triton]'"
    return None


def _triton_interpreted() -> bool:
    """Was triton imported under the interpreter? (triton.language's own jit functions tell.)"""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def interpreter_active() -> bool:
    """True when this process runs Triton kernels under the interpreter (checked without importing
    triton when it is not imported yet: then the environment decides)."""
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _triton_interpreted()


def enable_interpreter() -> None:
    """Make this process run Triton kernels under the interpreter (``TRITON_INTERPRET=1``).

    Raises RuntimeError when triton was already imported in compiled mode (it cannot switch).
    """
    if "triton" in sys.modules and not _triton_interpreted():
        raise RuntimeError("the Triton interpreter must be chosen before triton is imported (torch.export "
                           "imports it): set TRITON_INTERPRET=1 or call use_triton_kernels('interpret') first")
    os.environ["TRITON_INTERPRET"] = "1"
    err = triton_error()
    if err:
        raise RuntimeError(err)


def kernels(op: str) -> ModuleType:
    """The Triton kernels module of ``op`` (``route`` or ``moe``), decorated in triton's mode."""
    name = f"dsmoe.plugins.{op}.kernels"
    if name in sys.modules:
        return sys.modules[name]
    err = triton_error()
    if err:
        raise RuntimeError(err)
    interp = _triton_interpreted()
    # @triton.jit reads TRITON_INTERPRET when it decorates: match the mode triton was imported in
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interp else "0"
    try:
        return importlib.import_module(name)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def run_mode(device: torch.device) -> tuple[bool, int]:
    """``(interpreted, arch)`` for tensors on ``device``: CUDA tensors run compiled for the device's
    architecture, CPU tensors under the interpreter (sm_90 configurations); else ValueError."""
    interpreted = interpreter_active()
    if device.type == "cuda" and not interpreted:
        major, minor = torch.cuda.get_device_capability(device)
        return False, 10 * major + minor
    if device.type == "cpu" and interpreted:
        return True, INTERPRETER_ARCH
    if device.type == "cpu":
        raise ValueError("dsmoe: the Triton kernels run CPU tensors only under the interpreter "
                         "(use_triton_kernels('interpret') or TRITON_INTERPRET=1)")
    raise ValueError(f"dsmoe: the Triton kernels cannot run {device} tensors in this process"
                     + (" (TRITON_INTERPRET=1)" if interpreted else ""))


def dot_in_fp32(dtype: torch.dtype, interpreted: bool) -> bool:
    """The kernels' ``F32_DOT`` constexpr: fp32 operands take ``tl.dot(..., input_precision="ieee")``
    (tf32 would miss the 1e-4 tolerance). Under the interpreter bf16 operands are upcast too: its
    ``tl.dot`` multiplies bf16 bit patterns as integers (triton-lang/triton#11584, unsupported)."""
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


@dataclass(frozen=True)
class Buffer:
    """A workspace buffer: element type (``i32``, ``fp32``, ``{x}`` = the input dtype), element count
    as a formula of the sizes, zeroed before the first launch or not."""

    name: str
    type: str
    numel: str
    zeroed: bool = False


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what the PyTorch launcher runs and what the AOT manifest records.

    ``args``: ordered ``(name, type)``; a type is a Triton signature type (``*fp32``, ``i32``,
    ``fp32``) where ``*{x}`` stands for a pointer to the input dtype. ``grid``: three formulas in
    the runtime sizes (T, H, E, K, I) and ``cdiv``/``min``/``max``, constexprs already substituted.
    """

    kernel: str
    args: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, int | bool], ...]
    num_warps: int
    num_stages: int
    grid: tuple[str, str, str]
    requires: tuple[tuple[str, int], ...] = field(default=())  # AOT only: size -> divisor

    def types(self, dtype: torch.dtype) -> list[str]:
        """The runtime arguments' Triton types for inputs of ``dtype``."""
        return [t.replace("{x}", TYPE_OF_DTYPE[dtype]) for _, t in self.args]

    def grid_of(self, **sizes: int) -> tuple[int, int, int]:
        return tuple(evaluate(f, **sizes) for f in self.grid)

    def run(self, module: ModuleType, sizes: dict[str, int], values: dict, extra_constexprs: dict) -> None:
        """Launch ``module.<kernel>`` with ``values`` (by argument name) on the grid of ``sizes``."""
        grid = self.grid_of(**sizes)
        if 0 in grid:
            return
        fn = getattr(module, self.kernel)
        fn[grid](*(values[n] for n, _ in self.args), **dict(self.constexprs), **extra_constexprs,
                 num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=True)
