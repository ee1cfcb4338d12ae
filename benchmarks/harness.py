"""``dsmoe bench``: the benchmark harness (suites × backends on this machine, in one process).

For each suite: build the workload (seeded random weights and inputs), measure this machine's
limits, prepare every requested backend (unavailable ones are recorded as skipped with the
reason), check each backend's output against eager on every case (a wrong backend is not
timed), then time case by case with the backends interleaved, so that ratios come from the same
minutes of a possibly busy machine. Results go to ``<out_dir>/<machine>-<suite>.{json,md,png}``.

Pieces: :mod:`dsmoe.bench.suites` (what is measured), :mod:`dsmoe.bench.backends` (the
registry), :mod:`dsmoe.bench.timing` (method, cross-check), :mod:`dsmoe.bench.limits`
(bandwidth, GEMM rate, floors), :mod:`dsmoe.bench.report` (table and files).
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from dsmoe.bench import quant_backends  # noqa: F401  (registers ort-int8/int4, llama.cpp-q8_0/q4_0)
from dsmoe.bench.backends import REGISTRY, Unsupported
from dsmoe.bench.limits import Limits, floor_s, measure_gpu_limits, measure_limits
from dsmoe.bench.peer import run_peer
from dsmoe.bench.report import SCHEMA, check_result_paths, machine_info, print_table, stem, versions, write_files
from dsmoe.bench.suites import SEED, SUITES, Workload, model_workload, moe_layer_workload, quant_workload
from dsmoe.bench.timing import FULL, GPU_FULL, GPU_QUICK, QUICK, Method, cross_check, measure
from rich.console import Console

from dsmoe.app.device import resolve_device
from dsmoe.dtypes import BENCH_RTOL, parse_dtype, tag
from dsmoe.errors import DsmoeError
from dsmoe.outputs import Interrupted

DEFAULT_OUT = Path("out/bench")  # never the source tree; `--out benchmarks/results` to commit a run
DEFAULT_BACKENDS = ("eager", "fused", "grouped_mm", "cuda", "cuda-graph", "ort", "genai", "ort-cuda")
# suites with backends of their own (run only there by default)
SUITE_BACKENDS = {"quant": ("eager", "ort", "ort-int8", "ort-int4", "llama.cpp-q8_0", "llama.cpp-q4_0")}

# What each suite measures, full and quick. Quick is a smoke run of every backend: `moe-layer` on
# the `small` preset's layer, `model` and `quant` on the `tiny` preset; the 16B-wide model's setup
# alone (init, capture, ONNX export of 4.4 GB) takes minutes here, and even `small`'s ONNX export
# does not fit a 2-minute run on 2 cores.
SIZES = {
    ("moe-layer", False): dict(source="preset:deepseek-moe-16b", overrides={}, tokens=[1, 8, 32, 128, 512]),
    # quick: a smoke run of every backend, within 2 GiB; the 16B layer (2.3 GB fp32, copied per
    # backend: eager, fused, grouped_mm, the ONNX export and its session) peaked at 8.9 GB
    ("moe-layer", True): dict(source="preset:small", overrides={}, tokens=[1, 16]),
    ("model", False): dict(source="preset:deepseek-moe-16b", overrides={"num_hidden_layers": 2}, prefill=128, decode=32),
    ("model", True): dict(source="preset:tiny", overrides={"num_hidden_layers": 2}, prefill=32, decode=8),
    # the quantized backends on the model suite's 16B-wide 2-layer model (quick: tiny)
    ("quant", False): dict(source="preset:deepseek-moe-16b", overrides={"num_hidden_layers": 2}, prefill=128, decode=32),
    ("quant", True): dict(source="preset:tiny", overrides={"num_hidden_layers": 2}, prefill=32, decode=8),
    # on a GPU: the sizes, T up to 4096, and the whole 28-layer model (33 GB in bf16)
    ("moe-layer", False, "cuda"): dict(source="preset:deepseek-moe-16b", overrides={},
                                       tokens=[1, 4, 16, 64, 256, 1024, 4096]),
    ("moe-layer", True, "cuda"): dict(source="preset:deepseek-moe-16b", overrides={}, tokens=[1, 64, 4096]),
    ("model", False, "cuda"): dict(source="preset:deepseek-moe-16b", overrides={}, prefill=128, decode=32),
    ("model", True, "cuda"): dict(source="preset:deepseek-moe-16b", overrides={"num_hidden_layers": 4},
                                  prefill=32, decode=8),
}

GOALS = {
    "moe-layer": [("ort ≥ 1.5× eager at every T", "ort", 1.5), ("fused ≥ 1.3× eager at every T", "fused", 1.3),
                  ("best backend at T=1 within 1.3× of the memory floor", None, 1.3)],
    "model": [("ort decode ≥ 1.5× eager per token", "ort", 1.5)],
    "quant": [],  # quant_goals: ratios between backends and to each backend's own floor
}
# (goal, backend, reference backend, at most): dsmoe's own ORT loop against GenAI on the same export
PEER_GOALS = {"model": [("ort (dsmoe's loop) decode within 1.1× of genai per token", "ort", "genai", 1.1)]}


def run_bench(*, suites: Sequence[str] = SUITES, backends: Sequence[str] | None = None, quick: bool = False,
              out_dir: str | Path | None = None, threads: int | None = None,
              progress: bool | Callable[[str], None] = True, preset: str | None = None,
              overrides: dict | None = None, tokens: Sequence[int] | None = None,
              method: Method | None = None, limits: Limits | None = None, write: bool = True,
              device: str = "cpu", dtype: str | None = None, force: bool = False) -> dict:
    """Run the benchmark; returns ``{"machine", "suites": {suite: document}, "files": [...]}``.

    ``preset``/``overrides``/``tokens``/``method``/``limits`` override the sizes, timing method and
    limits (tests use the tiny preset, one iteration and fixed limits). ``device="cuda"`` runs the
    workloads on the GPU (default dtype bf16; sizes, timing and limits for a GPU). Unknown suite or
    backend names raise :class:`DsmoeError`.
    """
    dev = resolve_device(device)
    tdtype = _dtype(dtype, dev)
    suites = list(suites)
    chosen = list(backends) if backends else None
    for s in suites:
        if s not in SUITES:
            raise DsmoeError(f"unknown suite {s!r} (suites: {', '.join(SUITES)}, all)")
    for b in chosen or []:
        if b not in REGISTRY:
            raise DsmoeError(f"unknown backend {b!r} (backends: {', '.join(REGISTRY)})")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DsmoeError(f"--threads must be at least 1, got {threads!r}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    console = Console(width=max(Console().width, 130))
    say = progress if callable(progress) else (lambda msg: console.print(f"[dim]{msg}[/]")) if progress else (lambda msg: None)
    out_dir = Path(out_dir) if out_dir else DEFAULT_OUT
    if dev.type == "cuda":
        meth = method or (GPU_QUICK if quick else GPU_FULL)
    else:
        meth = method or (QUICK if quick else FULL)
    result = {"machine": machine_info(threads, dev), "suites": {}, "files": []}
    if write:  # results files that exist are refused before minutes of work (unless force)
        for suite in suites:
            check_result_paths(out_dir, stem({"machine": result["machine"], "suite": suite, "quick": quick}), force=force)
    for suite in suites:
        if _peer_run(suite, quick, dev, preset, overrides, tokens, method, limits):
            if chosen and len(suites) == 1:
                raise DsmoeError("--backend does not apply to the quant suite's comparison with llama.cpp (it runs every "
                                 "contender); the eager-checked quantized backends run with --quick or --preset")

            doc = run_peer(threads=threads, out_dir=out_dir if write else None, progress=say)
            result["suites"][suite] = doc
            result["files"] += doc.get("files", [])
            continue
        backends = list(chosen or [b for b in SUITE_BACKENDS.get(suite, DEFAULT_BACKENDS) if b in REGISTRY])
        if "eager" not in backends:
            backends.insert(0, "eager")  # the reference every other backend is checked against
        doc = _run_suite(suite, backends, quick, threads, meth, say, preset, overrides, tokens, limits, dev, tdtype)
        doc["machine"] = result["machine"]
        result["suites"][suite] = doc
        if progress:
            print_table(doc, console)
        if write:
            files = write_files(doc, out_dir, force=force)
            result["files"] += [str(p) for p in files]
            say(f"wrote {', '.join(str(p) for p in files)}")
    return result


CPU = torch.device("cpu")


def _peer_run(suite, quick, dev, preset, overrides, tokens, method, limits) -> bool:
    """The full ``quant`` suite on the CPU, at its own sizes, is the comparison with llama.cpp as its users
    run it (:mod:`dsmoe.bench.peer`); quick runs and other sizes stay eager-checked (this harness)."""
    return (suite == "quant" and not quick and dev.type == "cpu"
            and preset is None and overrides is None and tokens is None and method is None and limits is None)


def _dtype(name: str | None, dev: torch.device) -> torch.dtype:
    return parse_dtype(name, default="bfloat16" if dev.type == "cuda" else "float32")


def _run_suite(suite, backends, quick, threads, meth, say, preset, overrides, tokens, limits,
               dev: torch.device = CPU, dtype=torch.float32) -> dict:
    size = dict(SIZES[(suite, quick, "cuda") if dev.type == "cuda" else (suite, quick)])
    if preset:
        size["source"] = f"preset:{preset}"
    if overrides is not None:
        size["overrides"] = overrides
    if tokens is not None:
        size["tokens" if suite == "moe-layer" else "prefill"] = list(tokens) if suite == "moe-layer" else tokens[0]
    load_start = os.getloadavg()[0]
    say(f"[{suite}] measuring this machine's bandwidth and GEMM rate")
    if limits is None:
        lim = measure_gpu_limits(dev, dtype, quick=quick) if dev.type == "cuda" else measure_limits(quick=quick)
    else:
        lim = limits
    say(f"[{suite}] building the workload ({size['source']}, {size['overrides'] or 'no overrides'}, "
        f"{tag(dtype)} on {dev})")
    t = time.perf_counter()
    if suite == "moe-layer":
        w = moe_layer_workload(size["source"], size["overrides"], size["tokens"], device=dev, dtype=dtype)
    else:
        make = quant_workload if suite == "quant" else model_workload
        w = make(size["source"], size["overrides"], size["prefill"], size["decode"], device=dev, dtype=dtype)
    say(f"[{suite}] workload ready in {time.perf_counter() - t:.1f} s")
    prepared, binfo = _prepare_all(w, backends, threads, say)
    cases = [_run_case(w, c, prepared, binfo, meth, lim, say) for c in w.cases]
    for p in prepared.values():
        if p.cleanup:
            p.cleanup()
    doc = {"schema": SCHEMA, "suite": suite, "quick": quick,
           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "versions": versions(), "dtype": tag(dtype), "device": str(dev), "seed": SEED, "shapes": w.shapes,
           "method": meth.as_dict(),
           "limits": lim.as_dict(), "backends": binfo, "cases": cases,
           "load": {"start": load_start, "end": os.getloadavg()[0]}}
    doc["goals"] = evaluate_goals(doc)
    doc["goals_apply"] = _default_workload(suite, quick, preset, overrides, tokens)
    del w, prepared
    gc.collect()
    return doc


def _default_workload(suite, quick, preset, overrides, tokens) -> bool:
    """Whether this run measured the workload the goals are defined on (the full default sizes):
    a quick run, another preset or other sizes are evaluated in the JSON but not judged in print."""
    return not quick and preset is None and overrides is None and tokens is None


def _prepare_all(w: Workload, names, threads, say):
    prepared, info = {}, {}
    for name in names:
        b = REGISTRY[name]
        info[name] = {"description": b.description, "status": "ok", "reason": "", "prepare_s": None, "notes": {}}
        ok, why = b.available()
        if not ok:
            info[name].update(status="skipped", reason=why)
            say(f"[{w.suite}] {name}: skipped ({why})")
            continue
        say(f"[{w.suite}] preparing {name}")
        t = time.perf_counter()
        try:
            p = b.prepare(w, threads)
        except Unsupported as e:
            info[name].update(status="skipped", reason=str(e))
            say(f"[{w.suite}] {name}: skipped ({e})")
            continue
        except Interrupted:  # a signal ends the benchmark, it is not a backend failure
            raise
        except Exception as e:  # a backend that breaks is reported, the run goes on
            info[name].update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
            say(f"[{w.suite}] {name}: failed ({type(e).__name__}: {e})")
            continue
        info[name].update(prepare_s=time.perf_counter() - t, notes=p.notes)
        prepared[name] = p
        gc.collect()
    return prepared, info


def _run_case(w: Workload, case, prepared, binfo, meth: Method, lim: Limits, say) -> dict:
    fl = floor_s(case.work, lim)
    out = {"case": case.name, "tokens": case.tokens, "per": case.per, "info": case.info,
           "work": {"bytes": case.work.bytes, "flops": case.work.flops}, "floor": fl, "results": {}}
    with torch.inference_mode():
        ref = case.run(prepared["eager"].fn)
    res = out["results"]
    for name in binfo:
        if name not in prepared:
            res[name] = {"status": binfo[name]["status"], "reason": binfo[name]["reason"]}
            continue
        p = prepared[name]
        rtol = p.rtol or BENCH_RTOL[w.dtype]  # max|out − ref| ≤ rtol · max|ref|
        try:
            if p.external:  # times itself; it returns no outputs to check
                say(f"[{w.suite}] {case.name} {name}: timing (external)")
                chk, t = None, p.fn.time(case)
            else:
                with torch.inference_mode():
                    chk = cross_check(case.run(p.fn), ref, rtol=rtol)
        except Interrupted:
            raise
        except Exception as e:
            res[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
            continue
        if chk is not None and not chk.ok:
            res[name] = {"status": "mismatch", "reason": f"not timed: {chk.detail}", "check": chk.as_dict()}
            say(f"[{w.suite}] {case.name} {name}: output mismatch vs eager, not timed ({chk.detail})")
            continue
        if chk is not None:
            say(f"[{w.suite}] {case.name} {name}: timing")
            t = measure(lambda fn=p.fn: case.run(fn), meth, w.device)
        lat = t.median_s / case.per
        own = fl if p.weight_bytes is None or case.work_at is None else floor_s(case.work_at(p.weight_bytes), lim)
        res[name] = {"status": "ok", "check": chk.as_dict() if chk else None, "timing": t.as_dict(), "latency_s": lat,
                     "floor_fraction": own["floor_s"] / lat, "floor": own if own is not fl else None}
    eager = res.get("eager", {}).get("latency_s")
    for r in res.values():
        if r["status"] == "ok":
            r["vs_eager"] = eager / r["latency_s"] if eager else None
    return out


def evaluate_goals(doc: dict) -> list[dict]:
    """The issue's targets, evaluated on this run (reported, never asserted)."""
    if doc.get("device", "cpu").startswith("cuda"):
        return gpu_goals(doc)
    if doc["suite"] == "quant":
        return quant_goals(doc)
    out = []
    cases = doc["cases"]
    for text, backend, target in GOALS[doc["suite"]]:
        if backend is None:  # best backend at the smallest T vs the memory floor
            c = min(cases, key=lambda c: c["tokens"])
            ok = {n: r for n, r in c["results"].items() if r["status"] == "ok"}
            if not ok:
                out.append({"goal": text, "met": None, "detail": "no backend ran"})
                continue
            best = min(ok, key=lambda n: ok[n]["latency_s"])
            x = ok[best]["latency_s"] / c["floor"]["memory_s"]
            out.append({"goal": text, "met": x <= target, "value": x,
                        "detail": f"{best} at {c['case']}: {x:.2f}× the memory floor ({ok[best]['latency_s'] * 1e3:.1f} ms vs "
                                  f"{c['floor']['memory_s'] * 1e3:.1f} ms)"})
            continue
        sel = [c for c in cases if doc["suite"] == "moe-layer" or c["case"].startswith("decode")]
        got = [(c["case"], c["results"].get(backend, {})) for c in sel]
        if not got or any(r.get("status") != "ok" for _, r in got):
            why = "; ".join(f"{n}: {r.get('status', 'absent')} {r.get('reason', '')}".strip() for n, r in got if r.get("status") != "ok")
            out.append({"goal": text, "met": None, "detail": f"{backend} did not run on every case ({why})"})
            continue
        worst = min(got, key=lambda kv: kv[1]["vs_eager"])
        out.append({"goal": text, "met": worst[1]["vs_eager"] >= target, "value": worst[1]["vs_eager"],
                    "detail": "speed-ups " + ", ".join(f"{n}: {r['vs_eager']:.2f}×" for n, r in got)
                              + f"; worst {worst[0]} at {worst[1]['vs_eager']:.2f}× (target {target}×)"})
    for text, backend, peer, target in PEER_GOALS.get(doc["suite"], []):
        dec = [c for c in cases if c["case"].startswith("decode")]
        if not any(c["results"].get(peer, {}).get("status") == "ok" for c in dec):
            out.append({"goal": text, "met": None, "detail": f"{peer} did not run"})
            continue
        vals = [(c["case"], (a["latency_s"] / b["latency_s"]) if (a := _ok(c, backend)) and (b := _ok(c, peer)) else None)
                for c in dec]
        out.append(_goal(text, vals, target, at_most=True))
    return out


# ---- quant goals (issue 16) --------------------------------------------------------------------

def quant_goals(doc: dict) -> list[dict]:
    """Decode per token: ORT int4 ≥ 1.2× llama.cpp Q4_0, int8 ≥ 1.2× Q8_0, int4 ≥ 3× ORT fp32, and
    ORT int4 at ≥ 80% of the memory floor of the bytes it reads."""
    dec = [c for c in doc["cases"] if c["case"].startswith("decode")]

    def lat(c, b):
        r = _ok(c, b)
        return r["latency_s"] if r else None

    def ratio(c, slow, fast):
        a, b = lat(c, slow), lat(c, fast)
        return a / b if a and b else None

    def own_floor(c, b):
        r = _ok(c, b)
        return r["floor_fraction"] if r else None

    return [
        _goal("ort-int4 decode ≥ 1.2× llama.cpp-q4_0", [(c["case"], ratio(c, "llama.cpp-q4_0", "ort-int4")) for c in dec], 1.2),
        _goal("ort-int8 decode ≥ 1.2× llama.cpp-q8_0", [(c["case"], ratio(c, "llama.cpp-q8_0", "ort-int8")) for c in dec], 1.2),
        _goal("ort-int4 decode ≥ 3× ort (fp32)", [(c["case"], ratio(c, "ort", "ort-int4")) for c in dec], 3.0),
        _goal("ort-int4 decode ≥ 80% of the memory floor of the bytes it reads",
              [(c["case"], own_floor(c, "ort-int4")) for c in dec], 0.8, unit="%"),
    ]


# ---- GPU goals (issue: CUDA kernels) ----------------------------------------------------------

def _ok(case: dict, backend: str) -> dict | None:
    r = case["results"].get(backend, {})
    return r if r.get("status") == "ok" else None


def _goal(text: str, values: list[tuple[str, float | None]], target: float, *, at_most: bool = False,
          unit: str = "×") -> dict:
    """One goal over cases: each (case, value) must be >= target (<= with ``at_most``)."""
    missing = [c for c, v in values if v is None]
    if not values or missing:
        return {"goal": text, "met": None, "detail": f"not measured at {', '.join(missing) or 'any case'}"}
    worst = max(values, key=lambda cv: cv[1]) if at_most else min(values, key=lambda cv: cv[1])
    met = worst[1] <= target if at_most else worst[1] >= target
    fmt = (lambda v: f"{v:.0%}") if unit == "%" else (lambda v: f"{v:.2f}×")
    return {"goal": text, "met": met, "value": worst[1],
            "detail": ", ".join(f"{c}: {fmt(v)}" for c, v in values) + f"; worst {worst[0]} (target {fmt(target)})"}


def gpu_goals(doc: dict) -> list[dict]:
    """The CUDA issue's goals: T=1 vs the weight-read floor and vs eager, bandwidth at T=16…256,
    GEMM rate at T=4096, vs torch._grouped_mm at T ≤ 256 (each with the faster of ``cuda`` and
    ``cuda-graph``); decode per token (``cuda-graph``) vs its floor."""
    cases = doc["cases"]
    if doc["suite"] == "model":
        dec = [c for c in cases if c["case"].startswith("decode")]
        vals = [(c["case"], (r["latency_s"] / c["floor"]["floor_s"]) if (r := _ok(c, "cuda-graph")) else None)
                for c in dec]
        return [_goal("cuda-graph decode ≤ 2× the floor of reading the active weights", vals, 2.0, at_most=True)]
    by_t = {c["tokens"]: c for c in cases}

    def vals(ts, f):
        return [(by_t[t]["case"], f(by_t[t])) for t in ts if t in by_t]

    def lat(c, b):
        r = _ok(c, b)
        return r["latency_s"] if r else None

    def best(c):  # dsmoe's kernels, launched one by one or replayed from a CUDA graph
        got = [x for x in (lat(c, "cuda"), lat(c, "cuda-graph")) if x]
        return min(got) if got else None

    def ratio(num, den):
        return num / den if num and den else None

    small = [t for t in by_t if t <= 256]
    mid = [t for t in by_t if 16 <= t <= 256]
    return [
        _goal("cuda at T=1 within 1.5× of the weight-read floor",
              vals([1], lambda c: ratio(best(c), c["floor"]["memory_s"])), 1.5, at_most=True),
        _goal("cuda ≥ 20× eager at T=1", vals([1], lambda c: ratio(lat(c, "eager"), best(c))), 20.0),
        _goal("cuda ≥ 70% of the measured HBM bandwidth on the bytes touched, T=16…256",
              vals(mid, lambda c: ratio(c["floor"]["memory_s"], best(c))), 0.7, unit="%"),
        _goal("cuda ≥ 50% of the measured GEMM rate at T=4096",
              vals([4096], lambda c: ratio(c["floor"]["compute_s"], best(c))), 0.5, unit="%"),
        _goal("cuda ≥ 1.5× torch._grouped_mm at every T ≤ 256",
              vals(small, lambda c: ratio(lat(c, "grouped_mm"), best(c))), 1.5),
    ]
