"""llama.cpp, the CPU baseline: find its ``llama-bench``, run it on a GGUF, read its timings.

llama.cpp is not a dependency: it is built by hand from the sources the ``llama-cpp-python``
source package vendors (``benchmarks/README.md`` has the commands) into ``out/llama.cpp/build``
(ignored by git), or found through ``$DSMOE_LLAMA_BENCH`` or ``PATH``. Where none is found the
backend is reported as skipped with that reason — never silently missing.

``llama-bench`` times its own runs (``-r`` repetitions after a warm-up): prompt processing of
P tokens (``-p P -n 0``) and generation of N tokens after a context of D tokens (``-n N -d D``),
threads ``-t``; with ``-o json`` each test reports ``avg_ns``/``stddev_ns`` and tokens/s.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from dsmoe.children import run_child

REPO = Path(__file__).resolve().parent.parent
BUILD_BIN = REPO / "out" / "llama.cpp" / "build" / "bin"
ENV = "DSMOE_LLAMA_BENCH"


def find_llama_bench() -> tuple[Path | None, str]:
    """``(path, "")`` or ``(None, why not)``."""
    for cand in (os.environ.get(ENV), BUILD_BIN / "llama-bench", shutil.which("llama-bench")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand), ""
    return None, (f"llama.cpp's llama-bench was not found (${ENV}, {BUILD_BIN.relative_to(REPO)}/llama-bench, PATH): "
                  "build it as benchmarks/README.md says")


@dataclass
class BenchRun:
    """One llama-bench test: seconds per call (``tokens`` tokens) and its spread."""

    tokens: int
    mean_s: float
    stddev_s: float
    reps: int
    tokens_per_s: float
    raw: dict

    def per_token_s(self) -> float:
        return self.mean_s / self.tokens


def run_llama_bench(model: str | Path, *, threads: int, prompt: int = 0, gen: int = 0, depth: int = 0,
                    reps: int = 3, timeout: float = 1800) -> BenchRun:
    """Run one llama-bench test (prompt processing when ``prompt``, else generation after ``depth``)."""
    exe, why = find_llama_bench()
    if exe is None:
        raise FileNotFoundError(why)
    argv = [str(exe), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json", "-p", str(prompt),
            "-n", str(gen), "-d", str(depth)]
    proc = run_child(argv, timeout=timeout)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"llama-bench exited {proc.returncode}: {tail[0][:300]}")
    tests = json.loads(proc.stdout)
    t = tests[0] if isinstance(tests, list) else tests
    n = prompt if prompt else gen
    return BenchRun(tokens=n, mean_s=t["avg_ns"] / 1e9, stddev_s=t["stddev_ns"] / 1e9, reps=len(t.get("samples_ns", [])) or reps,
                    tokens_per_s=t["avg_ts"], raw={k: t.get(k) for k in ("build_commit", "cpu_info", "model_type",
                                                                            "model_size", "n_threads", "type_k")})


def run_llama_bench_tests(model: str | Path, *, threads: int, prompts: list[int], gens: list[int], depths: list[int],
                          reps: int = 2, timeout: float = 3600, extra: tuple[str, ...] = ()) -> list[dict]:
    """One llama-bench call over every (prompt, gen, depth) combination; its tests as it reports
    them (``n_prompt``, ``n_gen``, ``n_depth``, ``avg_ns``, ``stddev_ns``, …)."""
    exe, why = find_llama_bench()
    if exe is None:
        raise FileNotFoundError(why)
    argv = [str(exe), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json",
            "-p", ",".join(map(str, prompts)), "-n", ",".join(map(str, gens)), "-d", ",".join(map(str, depths)), *extra]
    proc = run_child(argv, timeout=timeout)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"llama-bench exited {proc.returncode}: {tail[0][:300]}")
    tests = json.loads(proc.stdout)
    return tests if isinstance(tests, list) else [tests]


# ---- build recipe: what this CPU can run ----------------------------------------------------

_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


def amx_usable() -> bool:
    """Whether the kernel lets this process use AMX tiles (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XTILEDATA)``): a CPU can advertise ``amx_tile`` in a VM whose hypervisor does not enable the tile
    state, and then ggml's AMX kernels die with SIGILL at the first ``tilezero``."""

    if platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


def cmake_flags(flags: set[str] | None = None, amx_ok: bool | None = None) -> list[str]:
    """The ggml CPU options for this machine: ``-DGGML_NATIVE=ON`` (what llama.cpp's users build),
    unless the CPU advertises AMX that this kernel will not run — then the explicit list of what it
    does run (AVX2/FMA/F16C, AVX-512 F/BW/VL/VNNI/BF16, AVX-VNNI) with AMX off."""
    if flags is None:
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        line = next((x for x in text.splitlines() if x.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    if "amx_tile" not in flags or (amx_usable() if amx_ok is None else amx_ok):
        return ["-DGGML_NATIVE=ON"]
    has = {"GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_AVX512": "avx512f",
           "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni"}
    return (["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v in flags else 'OFF'}" for k, v in has.items()]
            + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])

