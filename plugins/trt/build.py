"""Build ``libdsmoe_trt_plugins.so``: the AOT kernels, the generated tables, nvcc, a content-hash cache.

1. ``dsmoe.plugins.aot.build_kernels(archs)`` compiles every launch configuration (cubin + manifest);
2. ``spec.render_header()`` and ``codegen.render_kernels(manifest)`` write ``dsmoe_plugin_spec.h``
   and ``dsmoe_kernels.cpp`` (the cubins embedded with ``.incbin``);
3. nvcc (as the host compiler's driver: no device code, ``-cudart none``) compiles the plugin
   sources against the TensorRT headers into the library, and the test harness shim beside it.

The library links neither libnvinfer nor libcuda nor cudart (the driver is opened at the first
enqueue). TensorRT headers: ``$TENSORRT_INCLUDE_DIR``, else ``../shared/third_party/tensorrt/include``
from the project root, else a system include directory holding ``NvInferRuntime.h``.

Builds are cached by a hash of everything that goes in (sources, spec, kernel sources, archs,
triton, nvcc and TensorRT versions) under ``build/trt-plugins/<hash>`` in a source checkout
(``$DSMOE_BUILD_DIR`` overrides; an installed package uses ``~/.cache/dsmoe``), so a clean clone
builds once and every later call reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dsmoe.errors import DsmoeError
from dsmoe.outputs import OutputDir
from dsmoe.plugins.aot import ARCHS, build_kernels, parse_arch
from dsmoe.plugins.trt import codegen, spec
from dsmoe.children import run_child

PLUGINS_DIR = Path(__file__).resolve().parent.parent          # plugins/ (dsmoe.plugins)
PROJECT_ROOT = PLUGINS_DIR.parent
LIBRARY_SOURCES = ("trt/dsPluginCommon.cpp", "trt/dsPluginFields.cpp", "trt/dsLauncher.cpp", "trt/dsLaunch.cpp",
                   "trt/cudaDriver.cpp", "trt/dsPlugins.cpp", "route/dsRoutePlugin.cpp", "moe/dsMoePlugin.cpp")
HEADERS = ("trt/dsPluginCommon.h", "trt/dsPluginTypes.h", "trt/dsLauncher.h", "trt/cudaDriver.h",
           "route/dsRoutePlugin.h", "moe/dsMoePlugin.h")
HARNESS_SOURCES = ("trt/harness.cpp",)
# what the generated tables are made from (a change rebuilds)
INPUTS = ("trt/spec.py", "trt/codegen.py", "trt/build.py", "aot.py", "_triton.py", "route/config.py",
          "route/kernels.py", "moe/config.py", "moe/kernels.py")
SYSTEM_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include",
                   "/usr/local/tensorrt/include", "/opt/tensorrt/include")


class PluginBuildError(DsmoeError):
    """The plugin library cannot be built here (no nvcc, no TensorRT headers, a compiler error)."""


@dataclass(frozen=True)
class PluginBuild:
    dir: Path
    library: Path
    harness: Path
    manifest: dict
    cached: bool


def find_nvcc() -> Path | None:
    """nvcc on PATH, else under ``$CUDA_HOME`` / ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    return None


def find_tensorrt_include() -> Path | None:
    """The directory holding ``NvInferRuntime.h`` (see the module docstring for the order)."""
    env = os.environ.get("TENSORRT_INCLUDE_DIR")
    if env:
        return Path(env) if (Path(env) / "NvInferRuntime.h").is_file() else None
    for d in (PROJECT_ROOT.parent / "shared" / "third_party" / "tensorrt" / "include", *map(Path, SYSTEM_INCLUDES)):
        if (d / "NvInferRuntime.h").is_file():
            return d
    return None


def toolchain() -> tuple[Path, Path]:
    """``(nvcc, TensorRT include dir)``, or :class:`PluginBuildError` saying which is missing."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise PluginBuildError("nvcc not found: install the CUDA toolkit (nvcc on PATH, or CUDA_HOME set) "
                               "to build the TensorRT plugins")
    inc = find_tensorrt_include()
    if inc is None:
        where = os.environ.get("TENSORRT_INCLUDE_DIR")
        raise PluginBuildError(f"TensorRT headers not found: no NvInferRuntime.h in TENSORRT_INCLUDE_DIR={where}" if where
                               else "TensorRT headers not found: set TENSORRT_INCLUDE_DIR to a directory holding "
                                    "NvInferRuntime.h (or place them at ../shared/third_party/tensorrt/include)")
    return nvcc, inc


def cache_root() -> Path:
    if os.environ.get("DSMOE_BUILD_DIR"):
        return Path(os.environ["DSMOE_BUILD_DIR"]) / "trt-plugins"
    if (PROJECT_ROOT / "pyproject.toml").is_file() and os.access(PROJECT_ROOT, os.W_OK):
        return PROJECT_ROOT / "build" / "trt-plugins"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsmoe" / "trt-plugins"


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def build_key(archs: list[str], nvcc: Path, include: Path) -> str:
    """The hash of everything the library is made from."""
    import triton  # lazy: optional dependency (the AOT kernel compiler)

    h = hashlib.sha256()
    for rel in (*LIBRARY_SOURCES, *HEADERS, *HARNESS_SOURCES, *INPUTS):
        h.update(rel.encode() + b"\0" + (PLUGINS_DIR / rel).read_bytes() + b"\0")
    version_h = include / "NvInferVersion.h"
    h.update(json.dumps([archs, triton.__version__, _version([str(nvcc), "--version"]), str(include),
                         version_h.read_text() if version_h.is_file() else ""]).encode())
    return h.hexdigest()[:16]


def build_plugins(archs=ARCHS, *, cache: bool = True) -> PluginBuild:
    """The built library for ``archs`` (``sm_80``, ``sm_90``, ...): from the cache when an identical
    build is there, else built now. Raises :class:`PluginBuildError` (one line) when it cannot be."""
    archs = sorted({a.strip() for a in ([archs] if isinstance(archs, str) else archs) if a.strip()})
    if not archs:
        raise PluginBuildError("no architecture given (e.g. --arch sm_80,sm_90)")
    for a in archs:
        try:
            parse_arch(a)
        except ValueError as e:
            raise PluginBuildError(str(e)) from None
    nvcc, include = toolchain()
    try:
        key = build_key(archs, nvcc, include)
    except ImportError as e:
        raise PluginBuildError(f"triton is needed to compile the kernels ({e}); pip install 'dsmoe[triton]'") from None
    final = cache_root() / key
    if cache and (final / spec.LIBRARY).is_file() and (final / "build.json").is_file():
        return _result(final, cached=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    try:
        _build_into(tmp, archs, nvcc, include, key)
        if cache:
            try:
                os.rename(tmp, final)  # atomic; a concurrent identical build may have won
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (final / spec.LIBRARY).is_file():
                    raise
            _prune(final.parent, keep=final)
            return _result(final, cached=False)
        return _result(tmp, cached=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_plugin_library(*, archs=None, out: str | Path, force: bool = False, cache: bool = True) -> PluginBuild:
    """``dsmoe build-plugins``: the library (built or from the cache) with its harness shim,
    ``plugins.json``, ``manifest.json`` and ``build.json`` in ``out`` (an :class:`OutputDir`)."""
    from_cache = build_plugins(archs or ARCHS, cache=cache)  # before claiming out: a missing nvcc writes nothing
    with OutputDir(out, force=force, kind="trt-plugins") as staging:
        for name in (spec.LIBRARY, spec.HARNESS, "plugins.json", "manifest.json", "build.json"):
            shutil.copy2(from_cache.dir / name, staging.path / name)
        staging.commit()
    if not cache:
        shutil.rmtree(from_cache.dir, ignore_errors=True)
    d = Path(out)
    return PluginBuild(d, d / spec.LIBRARY, d / spec.HARNESS, from_cache.manifest, from_cache.cached)


def _prune(root: Path, *, keep: Path, newest: int = 3) -> None:
    """Remove all but the ``newest`` finished builds (sources change; each build is ~10 MB)."""
    builds = sorted((d for d in root.iterdir() if d.is_dir() and (d / "build.json").is_file() and d != keep),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for d in builds[newest - 1:]:
        shutil.rmtree(d, ignore_errors=True)


def _result(d: Path, *, cached: bool) -> PluginBuild:
    return PluginBuild(d, d / spec.LIBRARY, d / spec.HARNESS, json.loads((d / "manifest.json").read_text()), cached)


def _build_into(d: Path, archs: list[str], nvcc: Path, include: Path, key: str) -> None:
    t0 = time.perf_counter()
    # 1. the kernels
    try:
        manifest = build_kernels(archs, d / "kernels")
    except (RuntimeError, ValueError) as e:
        raise PluginBuildError(f"kernel build failed: {e}") from None
    t_kernels = time.perf_counter() - t0
    # 2. the generated tables
    gen = d / "gen"
    gen.mkdir()
    (gen / "dsmoe_plugin_spec.h").write_text(spec.render_header())
    (gen / "dsmoe_kernels.cpp").write_text(codegen.render_kernels(manifest, d / "kernels", relative_to=d))
    # 3. compile (one object per source, in parallel), then link
    flags = ["-std=c++17", "-O2", "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wno-deprecated-declarations",
             "-isystem", str(include), "-I", str(gen), "-I", str(PLUGINS_DIR / "trt"), "-I", str(PLUGINS_DIR / "route"),
             "-I", str(PLUGINS_DIR / "moe")]
    sources = [PLUGINS_DIR / s for s in LIBRARY_SOURCES] + [gen / "dsmoe_kernels.cpp"]
    objs = [d / "obj" / f"{s.stem}.o" for s in sources]
    (d / "obj").mkdir()
    jobs = [[str(nvcc), *flags, "-c", str(s), "-o", str(o)] for s, o in zip(sources, objs)]
    jobs.append([str(nvcc), *flags, "-shared", "-cudart", "none", str(PLUGINS_DIR / HARNESS_SOURCES[0]),
                 "-o", str(d / spec.HARNESS), "-ldl"])
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda cmd: _run(cmd, cwd=d), jobs))  # in d: .incbin finds kernels/... from there
    _run([str(nvcc), "-shared", "-cudart", "none", *map(str, objs), "-o", str(d / spec.LIBRARY), "-ldl"])
    shutil.rmtree(d / "obj")
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (d / "plugins.json").write_text(json.dumps(spec.describe(), indent=1))
    (d / "build.json").write_text(json.dumps({
        "key": key, "archs": archs, "nvcc": str(nvcc), "tensorrt_include": str(include),
        "seconds": {"kernels": round(t_kernels, 2), "total": round(time.perf_counter() - t0, 2)},
        "commands": jobs}, indent=1))


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = run_child(cmd, cwd=cwd)
    if proc.returncode:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        first = next((ln for ln in text if "error" in ln.lower()), text[0] if text else "")
        raise PluginBuildError(f"compiling the TensorRT plugins failed: {first.strip()[:300]}")
