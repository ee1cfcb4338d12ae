"""``dsmoe bench --suite serve``: ``dsmoe serve`` under load, and the cost of its live expert counts.

- **Load** (an existing tool drives it: locust, headless, with :mod:`dsmoe.bench.serve_locust`):
  streamed greedy completions of random 128-token prompts, 64 new tokens each, at concurrency
  1, 4 and 16 for ``duration`` seconds each (after a warm-up), against ``dsmoe serve`` on an
  export and — same weights and bits, when ``llama-server`` is found (``$DSMOE_LLAMA_SERVER`` or
  PATH) — llama.cpp's ``llama-server`` with 16 slots (``-np 16``) on a GGUF written by
  :mod:`dsmoe.bench.gguf_export`. Reported: output tokens/s, TTFT and time per output token
  percentiles (locust's own aggregation). The contenders run one after the other at each level.
- **Counting overhead**: decode throughput of the engine on a batch of 8 sequences, the plain
  export against the ``--router-stats`` export with the expert counting of ``dsmoe serve``
  (:func:`dsmoe.app.serve_metrics.counting`), runs alternating, medians.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from dsmoe.bench.gguf_export import write_gguf
from dsmoe.bench.report import machine_info
from dsmoe.bench.report import machine_info as _machine_info
from dsmoe.export import OrtDecoder, export_model

import dsmoe
from dsmoe.app.engine import Engine
from dsmoe.app.sampling import SamplingParams
from dsmoe.app.serve_metrics import ExpertLoad, counting
from dsmoe.errors import DsmoeError
from dsmoe.outputs import check_output_file, write_output_file

LEVELS = (1, 4, 16)
PROMPT_LEN, MAX_TOKENS = 128, 64


def counting_overhead(plain_dir: str, rs_dir: str, *, batch: int = 8, new_tokens: int = 48, repeats: int = 5,
                      threads: int | None = None) -> dict:
    """Decode tokens/s without and with expert counting (medians of alternating runs)."""


    plain = OrtDecoder(plain_dir, threads=threads)
    rs = OrtDecoder(rs_dir, threads=threads, router_stats=True)
    load = ExpertLoad(rs.config)
    spent = [0.0]
    add = load.add

    def timed_add(router):  # the counting's own time, measured inside the same runs (robust to load)
        t = time.perf_counter()
        add(router)
        spent[0] += time.perf_counter() - t

    load.add = timed_add
    steps = {"plain": plain, "counting": counting(rs, load)}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, plain.config.vocab_size, (32,), generator=g).tolist() for _ in range(batch)]
    rates: dict[str, list[float]] = {k: [] for k in steps}
    counted_s = total_s = 0.0
    for _ in range(repeats):
        for name, step in steps.items():
            eng = Engine(step, plain.config, dtype=plain.dtype, max_running=batch, max_step_tokens=batch * 64)
            seqs = [eng.add(p, SamplingParams(max_tokens=new_tokens, ignore_eos=True)) for p in prompts]
            eng.step()  # prefill every prompt (one iteration's budget) and decode nothing yet
            spent[0] = 0.0
            t0 = time.perf_counter()
            eng.run()
            dt = time.perf_counter() - t0
            rates[name].append(sum(len(s.out) - 1 for s in seqs) / dt)
            if name == "counting":
                counted_s, total_s = counted_s + spent[0], total_s + dt
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"batch": batch, "new_tokens": new_tokens, "repeats": repeats, "tokens_per_s": med, "runs": rates,
            "overhead": 1 - med["counting"] / med["plain"], "counting_share": counted_s / total_s}


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DsmoeError(f"the server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise DsmoeError(f"{url} did not answer within {timeout:.0f} s")


def start_dsmoe(export: str, port: int, *, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from dsmoe.app.cli import main; main()", "serve", export, "--port", str(port),
           "--max-running", "16", "--served-model-name", "model", *(["--threads", str(threads)] if threads else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def start_llama(gguf: str, port: int, *, threads: int) -> subprocess.Popen:
    exe = os.environ.get("DSMOE_LLAMA_SERVER") or shutil.which("llama-server")
    if not exe:
        raise DsmoeError("llama-server not found (set DSMOE_LLAMA_SERVER or put llama.cpp's build/bin on PATH)")
    ctx = 16 * (PROMPT_LEN + MAX_TOKENS + 16)
    cmd = [exe, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", "16", "-c", str(ctx), "-t", str(threads),
           "--no-webui", "-a", "model"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def locust_level(url: str, concurrency: int, duration: int, *, vocab: int, seed: int = 0) -> dict:
    """One load level through locust; output tokens/s, TTFT and TPOT percentiles (ms)."""
    exe = os.environ.get("DSMOE_LOCUST") or shutil.which("locust")
    if not exe:
        raise DsmoeError("locust not found (pip install locust, or set DSMOE_LOCUST to its executable)")
    env = {**os.environ, "BENCH_MODEL": "model", "BENCH_PROMPT_LEN": str(PROMPT_LEN),
           "BENCH_MAX_TOKENS": str(MAX_TOKENS), "BENCH_VOCAB": str(vocab), "BENCH_SEED": str(seed)}
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "run")
        subprocess.run([exe, "-f", str(Path(__file__).with_name("serve_locust.py")), "--headless", "-u", str(concurrency),
                        "-r", str(concurrency), "-t", f"{duration}s", "--host", url, "--csv", prefix, "--only-summary",
                        "--stop-timeout", "0", "--loglevel", "ERROR"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(prefix + "_stats.csv") as f:
            rows = {r["Name"]: r for r in csv.DictReader(f)}
    def pct(name):
        r = rows.get(name)
        return None if r is None else {p: float(r[p]) for p in ("50%", "90%", "99%")}
    tok = rows.get("token")
    total = int(tok["Request Count"]) if tok else 0
    done = rows.get("tpot")
    comp = rows.get("completion")
    return {"concurrency": concurrency, "duration_s": duration, "requests": int(done["Request Count"]) if done else 0,
            "failures": int(comp["Failure Count"]) if comp else None, "output_tokens_per_s": total / duration,
            "ttft_ms": pct("ttft"), "tpot_ms": pct("tpot")}


def run_serve_bench(*, out_dir: str, work_dir: str = "out/bench-serve", preset: str = "small", threads: int | None = None,
                    duration: int = 60, quick: bool = False, progress=print, force: bool = False) -> dict:
    """The suite: artifacts in ``work_dir`` (made once), results in ``out_dir/<machine>-serve.{json,md}``
    (refused before any work if they exist, unless ``force``; written by :func:`write_output_file`)."""



    threads = threads or os.cpu_count() or 1
    stem = Path(out_dir) / f"{_machine_info(threads)['name']}-serve{'-quick' if quick else ''}"
    for p in (stem.with_suffix(".json"), stem.with_suffix(".md")):  # before the minutes of work
        check_output_file(p, force=force, option="--out")
    duration = 15 if quick else duration
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    src = f"preset:{preset}"
    arts = {"fp32": work / f"{preset}-ort", "rs": work / f"{preset}-ort-rs", "int4": work / f"{preset}-ort-int4"}
    for kind, d in arts.items():
        if not (d / "model.onnx").is_file():
            progress(f"export {src} → {d}")
            export_model(src, out=str(d), router_stats=kind == "rs", quant="int4" if kind == "int4" else None,
                         block_size=32 if kind == "int4" else None)  # Q4_0's blocks: symmetric, 32
    gguf = work / f"{preset}-q4_0.gguf"
    if not gguf.is_file():
        progress(f"GGUF Q4_0 → {gguf}")
        write_gguf(src, gguf, qtype="Q4_0", placeholder_vocab=True)
    vocab = dsmoe.load_config(src).vocab_size
    load_before = os.getloadavg()
    progress("expert counting overhead")
    overhead = counting_overhead(str(arts["fp32"]), str(arts["rs"]), threads=threads, repeats=3 if quick else 5)
    levels: dict[str, list[dict]] = {"dsmoe-int4": [], "llama-server-q4_0": []}
    starters = {"dsmoe-int4": lambda port: start_dsmoe(str(arts["int4"]), port, threads=threads),
                "llama-server-q4_0": lambda port: start_llama(str(gguf), port, threads=threads)}
    notes, procs, urls = [], {}, {}
    try:
        for i, (name, start) in enumerate(starters.items()):
            try:
                procs[name] = start(8931 + i)
                urls[name] = f"http://127.0.0.1:{8931 + i}"
            except DsmoeError as e:
                notes.append(f"{name}: not run ({e})")
        for url in urls.values():
            locust_level(url, 1, 5, vocab=vocab, seed=99)  # warm-up
        for c in LEVELS:  # the contenders alternate at each level (both up, the other idle)
            for name, url in urls.items():
                progress(f"{name}: concurrency {c}")
                levels[name].append(locust_level(url, c, duration, vocab=vocab))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(60)
    info = machine_info(threads)
    doc = {"suite": "serve", "machine": info, "preset": preset, "prompt_tokens": PROMPT_LEN, "max_tokens": MAX_TOKENS,
           "duration_s": duration, "tool": "locust (headless), benchmarks/serve_locust.py", "levels": levels,
           "counting_overhead": overhead, "notes": notes,
           "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    write_output_file(stem.with_suffix(".json"), json.dumps(doc, indent=2) + "\n", force=force, option="--out")
    write_output_file(stem.with_suffix(".md"), render(doc), force=force, option="--out")
    return doc


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# dsmoe serve under load — {m['cpu']} ({m['cores']} cores, {m['threads']} threads; "
             f"{', '.join(m.get('simd', []))})", "",
             f"`{doc['preset']}` preset, random {doc['prompt_tokens']}-token prompts, {doc['max_tokens']} new tokens each "
             f"(greedy, streamed), {doc['duration_s']} s per level, driven by {doc['tool']}. dsmoe: the int4 ONNX "
             f"Runtime export (`--quant int4 --block-size 32`); llama-server: the same weights as a Q4_0 GGUF, 16 slots. "
             f"1-minute load average before / after: {doc['load_average_before_after']}.", "",
             "| server | concurrency | requests | output tok/s | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) |",
             "|---|---|---|---|---|---|"]
    for server, rows in doc["levels"].items():
        for r in rows:
            t, p = r["ttft_ms"] or {}, r["tpot_ms"] or {}
            lines.append(f"| {server} | {r['concurrency']} | {r['requests']} | {r['output_tokens_per_s']:.1f} | "
                         f"{t.get('50%', 0):.0f} / {t.get('90%', 0):.0f} | {p.get('50%', 0):.1f} / {p.get('90%', 0):.1f} |")
    for server, rows in doc["levels"].items():
        by = {r["concurrency"]: r["output_tokens_per_s"] for r in rows}
        if by.get(1) and by.get(16):
            lines.append(f"\n{server}: concurrency 16 / concurrency 1 throughput = {by[16] / by[1]:.2f}×")
    a, b = doc["levels"].get("dsmoe-int4"), doc["levels"].get("llama-server-q4_0")
    if a and b and a[-1]["output_tokens_per_s"] and b[-1]["output_tokens_per_s"]:
        lines.append(f"\ndsmoe / llama-server at concurrency 16: {a[-1]['output_tokens_per_s'] / b[-1]['output_tokens_per_s']:.2f}×")
    o = doc["counting_overhead"]
    lines += ["", f"Expert counting overhead (engine decode, batch {o['batch']}, fp32 export vs its --router-stats "
              f"export with counting, medians of {o['repeats']} alternating runs): plain "
              f"{o['tokens_per_s']['plain']:.0f} tok/s, counting {o['tokens_per_s']['counting']:.0f} tok/s, "
              f"overhead {100 * o['overhead']:.1f}% (the two exports' difference, at this machine's noise); the "
              f"counting itself took {100 * o['counting_share']:.2f}% of the decode time (measured inside the runs)."]
    lines += [f"\nNote: {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"
