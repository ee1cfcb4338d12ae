"""Timing method: warm-up, then repeated timings under a per-case time budget; median and spread.

Iteration counts are adaptive so that a slow case (eager at T=512) does not eat the whole run:
after ``warmup`` untimed calls, a case is timed at least ``min_iters`` and at most ``max_iters``
times, stopping once ``budget_s`` seconds of timed calls have accumulated. The counts actually
used are recorded with every result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Method:
    warmup: int = 2
    min_iters: int = 3
    max_iters: int = 30
    budget_s: float = 4.0

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Method(warmup=1, min_iters=3, max_iters=20, budget_s=3.0)
QUICK = Method(warmup=1, min_iters=2, max_iters=5, budget_s=0.5)
# GPU: calls take microseconds to milliseconds; more warm-up (graph capture, kernel builds, cuBLAS
# heuristics) and many more timed calls, each between CUDA events
GPU_FULL = Method(warmup=3, min_iters=20, max_iters=200, budget_s=1.0)
GPU_QUICK = Method(warmup=2, min_iters=5, max_iters=30, budget_s=0.2)
ONCE = Method(warmup=0, min_iters=1, max_iters=1, budget_s=0.0)  # tests


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float          # interquartile range (p75 − p25)
    iters: int
    warmup: int

    @property
    def spread(self) -> float:
        """Relative spread: IQR / median."""
        return self.iqr_s / self.median_s if self.median_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def measure(fn: Callable[[], object], method: Method, device: str | torch.device | None = None) -> Timing:
    """Time ``fn``. On a CUDA device each call is bracketed by CUDA events and waited for: the
    latency of one call starting from an idle GPU, launch overheads included."""
    cuda = device is not None and torch.device(device).type == "cuda"
    with torch.inference_mode():
        for _ in range(method.warmup):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        times: list[float] = []
        while len(times) < method.max_iters:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            if len(times) >= method.min_iters and sum(times) >= method.budget_s:
                break
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = max(times) - min(times)
    return Timing(median_s=statistics.median(times), min_s=min(times), max_s=max(times), iqr_s=iqr,
                  iters=len(times), warmup=method.warmup)


@dataclass
class Check:
    ok: bool
    max_abs_err: float
    tolerance: float
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def cross_check(out, ref, *, rtol: float = 1e-3, atol: float = 1e-6) -> Check:
    """Compare a backend's output with eager's: ``max|out − ref| <= atol + rtol·max|ref|``.

    ``out``/``ref`` are tensors, arrays or (nested) tuples/lists of them; every leaf is compared.
    """
    outs, refs = _leaves(out), _leaves(ref)
    if len(outs) != len(refs):
        return Check(False, float("inf"), 0.0, f"{len(outs)} outputs, expected {len(refs)}")
    worst, tol = 0.0, 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        o, r = _tensor(o).float(), _tensor(r).float()
        if o.shape != r.shape:
            return Check(False, float("inf"), 0.0, f"output {i}: shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        t = atol + rtol * float(r.abs().max()) if r.numel() else atol
        err = float((o - r).abs().max()) if r.numel() else 0.0
        if not err <= t:  # also catches NaN
            return Check(False, err, t, f"output {i}: max abs error {err:.3g} > tolerance {t:.3g}")
        worst, tol = max(worst, err), max(tol, t)
    return Check(True, worst, tol)


def _leaves(x) -> list:
    if isinstance(x, (list, tuple)):
        return [leaf for item in x for leaf in _leaves(item)]
    return [x]


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
