"""Run-time build and launch of the plugins' CUDA sources.

``load(name)`` compiles ``plugins/<name>/<name>.cu`` for the current GPU's architecture with
NVRTC (``cuda.bindings.nvrtc``, or the older ``cuda.nvrtc``) or, when NVRTC is not importable,
with ``nvcc``; caches the cubin on disk under ``$DSMOE_KERNEL_CACHE`` (default
``~/.cache/dsmoe/kernels``) keyed by architecture and a hash of the sources, options and compiler;
and loads it with the CUDA driver API (``cuda.bindings.driver``) or, failing that, CuPy. Every
CUDA-side import is lazy: importing this module needs neither a GPU nor cuda-python.

Kernels are launched on PyTorch's current stream with an explicit argument signature, one letter
per argument: ``p`` pointer (a tensor, or None for null), ``i`` int32, ``q`` int64, ``f`` float32.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

PLUGIN_DIR = Path(__file__).resolve().parent
COMMON_HEADER = PLUGIN_DIR / "dsmoe_common.cuh"
CXX_STD = "c++17"

_modules: dict[tuple[str, int], Module] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("DSMOE_KERNEL_CACHE") or Path.home() / ".cache" / "dsmoe" / "kernels")


def source_path(name: str) -> Path:
    return PLUGIN_DIR / name / f"{name}.cu"


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME or /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def compile_options(arch: str) -> list[str]:
    """Options shared by NVRTC and nvcc (``arch`` like ``sm_90``)."""
    return [f"--gpu-architecture={arch}", f"-std={CXX_STD}", "-lineinfo"]


def cache_key(source: str, headers: dict[str, str], arch: str, compiler: str) -> str:
    """Stable key: kernel sources, headers, options, architecture and compiler identity."""
    h = hashlib.sha256()
    for part in (source, *(f"{k}\0{v}" for k, v in sorted(headers.items())), arch, compiler,
                 " ".join(compile_options(arch))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cache_path(name: str, arch: str, key: str) -> Path:
    return cache_dir() / f"{name}-{arch}-{key}.cubin"


def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import nvrtc  # older cuda-python
        except ImportError:
            return None
    return nvrtc


def _check(result, what: str):
    err, *rest = result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def compile_nvrtc(nvrtc, source: str, headers: dict[str, str], arch: str, name: str) -> bytes:
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), len(headers),
                                           [v.encode() for v in headers.values()],
                                           [k.encode() for k in headers]), "nvrtcCreateProgram")
    opts = [o.encode() for o in compile_options(arch)]
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed to compile {name}.cu for {arch}:\n{log.decode(errors='replace')}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check((nvrtc.nvrtcGetCUBIN(prog, cubin)[0], None), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_nvcc(nvcc: str, src: Path, arch: str, out: Path, *, fmt: str = "cubin") -> None:
    """``nvcc -<fmt>`` (cubin or ptx) of one source, headers from plugins/."""
    cmd = [nvcc, f"-{fmt}", *compile_options(arch), "-I", str(PLUGIN_DIR), "-o", str(out), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr}")


def _nvcc_identity(nvcc: str) -> str:
    res = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return f"nvcc:{nvcc}:{res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ''}"


def build(name: str, arch: str) -> Path:
    """The cubin of ``plugins/<name>/<name>.cu`` for ``arch``, compiled once and cached."""
    src = source_path(name)
    source = src.read_text()
    headers = {COMMON_HEADER.name: COMMON_HEADER.read_text()}
    nvrtc = _nvrtc()
    nvcc = None if nvrtc is not None else find_nvcc()
    if nvrtc is None and nvcc is None:
        raise RuntimeError("cannot compile CUDA kernels: neither NVRTC (cuda-python) nor nvcc is available")
    compiler = f"nvrtc{_check(nvrtc.nvrtcVersion(), 'nvrtcVersion')}" if nvrtc else _nvcc_identity(nvcc)
    path = cache_path(name, arch, cache_key(source, headers, arch, compiler))
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        if nvrtc is not None:
            tmp_path.write_bytes(compile_nvrtc(nvrtc, source, headers, arch, name))
        else:
            compile_nvcc(nvcc, src, arch, tmp_path)
        os.replace(tmp_path, path)  # atomic: concurrent builders never see half a file
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def device_arch(device) -> str:

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def load(name: str, device=None) -> Module:
    """The loaded module ``name`` for ``device`` (default: the current CUDA device)."""

    index = torch.cuda.current_device() if device is None else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    key = (name, index)
    if key not in _modules:
        with torch.cuda.device(index):
            _modules[key] = Module(build(name, device_arch(index)), index)
    return _modules[key]


class Module:
    """A loaded cubin: ``launch(kernel, grid, block, sig, args, smem=0)`` on torch's current stream."""

    def __init__(self, cubin: Path, device_index: int):

        self.path, self.device_index = cubin, device_index
        self._functions: dict[str, object] = {}
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{device_index}")  # the primary context exists and is current
        try:
            from cuda.bindings import driver
        except ImportError:
            try:
                from cuda import cuda as driver  # older cuda-python
            except ImportError:
                driver = None
        self._driver = driver
        if driver is not None:

            _check(driver.cuInit(0), "cuInit")
            dev = _check(driver.cuDeviceGet(device_index), "cuDeviceGet")
            # torch's runtime uses the primary context; launches make it current on their thread
            self._ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            image = np.frombuffer(cubin.read_bytes(), dtype=np.uint8)
            self._module = _check(driver.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
        else:
            try:
                import cupy
            except ImportError as e:
                raise RuntimeError("loading CUDA kernels needs cuda-python or CuPy") from e
            with cupy.cuda.Device(device_index):
                self._module = cupy.RawModule(path=str(cubin))

    def function(self, kernel: str):
        if kernel not in self._functions:
            if self._driver is not None:
                self._functions[kernel] = _check(
                    self._driver.cuModuleGetFunction(self._module, kernel.encode()), f"cuModuleGetFunction({kernel})")
            else:
                self._functions[kernel] = self._module.get_function(kernel)
        return self._functions[kernel]

    def launch(self, kernel: str, grid, block, sig: str, args, smem: int = 0) -> None:

        if len(sig) != len(args):
            raise ValueError(f"{kernel}: signature {sig!r} has {len(sig)} arguments, got {len(args)}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if min(grid) == 0:
            return
        vals = [np.array([_arg_value(c, a)], dtype=_NP[c]) for c, a in zip(sig, args)]
        fn = self.function(kernel)
        stream = torch.cuda.current_stream(self.device_index).cuda_stream
        if self._driver is not None:
            _check(self._driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            ptrs = np.array([v.ctypes.data for v in vals], dtype=np.uint64)
            (err,) = self._driver.cuLaunchKernel(fn, *grid, *block, smem, self._driver.CUstream(stream),
                                                 ptrs.ctypes.data, 0)
            if int(err) != 0:
                raise RuntimeError(f"cuLaunchKernel({kernel}, grid={grid}, block={block}) failed: {err!r}")
        else:
            import cupy

            with cupy.cuda.Device(self.device_index), cupy.cuda.ExternalStream(stream):
                fn(grid, block, tuple(v[0] for v in vals), shared_mem=smem)


_NP = {"p": "uint64", "i": "int32", "q": "int64", "f": "float32"}


def _arg_value(code: str, a):
    if code == "p":
        return 0 if a is None else a.data_ptr()
    if code in "iq":
        return int(a)
    if code == "f":
        return float(a)
    raise ValueError(f"unknown argument code {code!r}")
