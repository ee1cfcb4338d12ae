"""The whole 28-layer DeepSeekMoE-16B, int4, decoding on the CPU: dsmoe's ONNX Runtime export
against llama.cpp Q4_0 on the same weights (``dsmoe bench --suite quant-full``).

Neither fp32 baseline exists at this size on a 24 GB machine (61 GiB of weights), so this suite
has no eager reference: ``ort-int4`` is the streamed ``dsmoe-export --quant int4`` (its exactness
and accuracy are checked by the export, layer by layer, and recorded in its report), and
``llama.cpp-q4_0`` is a GGUF written from the same seeded weights. Both are timed in the same run
against the read bandwidth measured in it: ORT decodes ``decode`` tokens after a ``prefill``-token
prompt (greedy, its own tokens; the median of a few repetitions, per token), llama-bench generates
as many after as deep a context. Each backend's floor is the bytes it reads per token (its own
format) ÷ bandwidth.

The artifacts are made once and reused (``out/bench-cache/``): the export takes tens of minutes.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from dsmoe.bench.gguf_export import write_gguf
from dsmoe.bench.limits import floor_s, measure_limits, model_step_work
from dsmoe.bench.llama_cpp import find_llama_bench, run_llama_bench
from dsmoe.bench.report import SCHEMA, machine_info, versions
from dsmoe.bench.timing import Method, measure
from dsmoe.export import REPORT_FILE, OrtDecoder
from dsmoe.export.quant_report import linear_bytes_per_weight

import dsmoe
from dsmoe.children import run_child
from dsmoe.errors import DsmoeError
from dsmoe.outputs import check_output_file, write_output_file
from dsmoe.quant import GGML_BLOCK, GGML_BLOCK_BYTES

CACHE = Path(__file__).resolve().parent.parent / "out" / "bench-cache"
SOURCE = "preset:deepseek-moe-16b"
METHOD = Method(warmup=1, min_iters=2, max_iters=3, budget_s=10.0)


def _export(source: str, out: Path, say) -> dict:
    """``dsmoe-export SOURCE --quant int4`` (streamed) into ``out`` unless a finished one is there."""
    if not (out / REPORT_FILE).is_file():
        say(f"exporting {source} (int4, streamed) to {out}: tens of minutes")
        argv = [sys.executable, "-c", "from dsmoe.app.cli import export_main; export_main()", source, "--out", str(out),
                "--quant", "int4", "--force"]
        t = time.perf_counter()
        proc = run_child(argv)
        if proc.returncode:
            raise RuntimeError(f"dsmoe-export exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
        say(f"exported in {time.perf_counter() - t:.0f} s")
    return json.loads((out / REPORT_FILE).read_text())


def _time_ort(export_dir: Path, config, prefill: int, decode: int, threads: int) -> dict:
    """One round of ORT: load the session, prefill, then time greedy decode runs of ``decode`` tokens."""
    t = time.perf_counter()
    dec = OrtDecoder(export_dir, threads=threads, logits="auto", kv_inplace="auto")  # as `dsmoe generate` runs it
    load_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, prefill), generator=g)
    empty = [(torch.zeros(1, config.num_key_value_heads, 0, config.head_dim),) * 2 for _ in range(config.num_hidden_layers)]
    t = time.perf_counter()
    logits, kv = dec(ids, torch.ones(1, prefill, dtype=torch.int64), torch.arange(prefill)[None], empty)
    prefill_s = time.perf_counter() - t

    def run_decode():
        past, tok = kv, logits[:, -1:].argmax(-1)
        for i in range(decode):
            out, past = dec(tok, torch.ones(1, prefill + i + 1, dtype=torch.int64), torch.full((1, 1), prefill + i), past)
            tok = out[:, -1:].argmax(-1)

    tm = measure(run_decode, METHOD)
    rss = psutil.Process().memory_info().rss
    return {"per_token_s": tm.median_s / decode, "timing": tm.as_dict(), "session_load_s": load_s,
            "prefill_s": prefill_s, "rss_bytes": rss}


def refuse_unused(*, backends=(), quick: bool = False, preset: str | None = None, device: str = "cpu",
                  dtype: str | None = None, overrides=()) -> None:
    """``bench --suite quant-full`` runs one fixed comparison: the options it does not use are refused."""
    unused = [flag for flag, given in (("--backend", bool(backends)), ("--quick", quick), ("--preset", preset is not None),
                                       ("--device", device != "cpu"), ("--dtype", dtype is not None),
                                       ("--set", bool(overrides))) if given]
    if unused:
        raise DsmoeError(f"{', '.join(unused)} do(es) not apply to --suite quant-full (the whole {SOURCE} int4 model "
                         "against llama.cpp on the CPU, as written); drop it")


def run_quant_full(*, source: str = SOURCE, prefill: int = 128, decode: int = 32, threads: int | None = None,
                   out_dir: str | Path | None = None, progress=print, cache: Path = CACHE, rounds: int = 3,
                   force: bool = False) -> dict:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DsmoeError(f"--threads must be at least 1, got {threads!r}")
    threads = threads or os.cpu_count() or 1
    out = Path(out_dir) if out_dir else Path("out/bench")  # `--out benchmarks/results` to commit a run
    stem = out / f"{machine_info(threads)['name']}-quant-full"
    for p in (stem.with_suffix(".json"), stem.with_suffix(".md")):  # before the minutes of work
        check_output_file(p, force=force, option="--out")
    torch.set_num_threads(threads)
    config = dsmoe.load_config(source)
    tag = source.removeprefix("preset:").replace("/", "_")
    cache.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    progress("[quant-full] measuring this machine's bandwidth")
    lim = measure_limits()
    report = _export(source, cache / f"{tag}-int4", progress)
    hits = [config.num_experts_per_tok] * len(config.moe_layers)  # one token: K distinct experts per layer

    def floor(weight_bytes):
        w = model_step_work(config, 1, prefill + decode // 2, hits, weight_bytes=weight_bytes)
        return floor_s(w, lim) | {"bytes": w.bytes}

    results: dict = {}
    exe, why = find_llama_bench()
    gguf = cache / f"{tag}-Q4_0.gguf"
    if exe is None:
        results["llama.cpp-q4_0"] = {"status": "skipped", "reason": why}
    elif not gguf.is_file():
        progress(f"[quant-full] writing {gguf}")
        t = time.perf_counter()
        write_gguf(source, gguf.with_suffix(".tmp"), qtype="Q4_0")
        gguf.with_suffix(".tmp").rename(gguf)
        progress(f"[quant-full] GGUF written in {time.perf_counter() - t:.0f} s")
    # Rounds, each backend in turn (its model loaded, timed, let go: the two 9 GB models do not
    # both fit beside other work), so that load on the shared machine falls on both alike.
    ort_runs, llama_runs, loads = [], [], []
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        progress(f"[quant-full] round {r + 1}/{rounds}: ort-int4")
        ort_runs.append(_time_ort(cache / f"{tag}-int4", config, prefill, decode, threads))
        gc.collect()
        if exe is not None:
            progress(f"[quant-full] round {r + 1}/{rounds}: llama.cpp-q4_0")
            llama_runs.append(run_llama_bench(gguf, threads=threads, gen=decode, depth=prefill, reps=2))
    progress("[quant-full] measuring the bandwidth again (the faster of the two is the machine's)")
    again = measure_limits()
    if again.bandwidth_gbs > lim.bandwidth_gbs:
        lim = again
    own = floor(linear_bytes_per_weight(report["quant"]))
    lat = statistics.median(x["per_token_s"] for x in ort_runs)
    results["ort-int4"] = {"status": "ok", "latency_s": lat, "tokens_per_s": 1 / lat, "floor": own,
                           "floor_fraction": own["memory_s"] / lat, "rounds": ort_runs,
                           "export": {k: report[k] for k in ("seconds", "model_bytes")} | {"quant": report["quant"]}}
    if llama_runs:
        own = floor(GGML_BLOCK_BYTES["Q4_0"] / GGML_BLOCK)
        lat = statistics.median(x.per_token_s() for x in llama_runs)
        results["llama.cpp-q4_0"] = {"status": "ok", "latency_s": lat, "tokens_per_s": 1 / lat, "floor": own,
                                     "floor_fraction": own["memory_s"] / lat, "gguf_bytes": gguf.stat().st_size,
                                     "rounds": [{"per_token_s": x.per_token_s(), "stddev_s": x.stddev_s / decode,
                                                 "reps": x.reps} for x in llama_runs], "llama_bench": llama_runs[0].raw}
    a, b = results["ort-int4"], results.get("llama.cpp-q4_0", {})
    ratio = b["latency_s"] / a["latency_s"] if b.get("status") == "ok" else None
    goals = [{"goal": "ort-int4 decode ≥ 1.2× llama.cpp-q4_0 (28 layers)", "met": None if ratio is None else ratio >= 1.2,
              "value": ratio},
             {"goal": "ort-int4 decode ≥ 80% of the memory floor of the bytes it reads (28 layers)",
              "met": a["floor_fraction"] >= 0.8, "value": a["floor_fraction"]}]
    doc = {"schema": SCHEMA, "suite": "quant-full", "quick": False,
           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "versions": versions(),
           "machine": machine_info(threads), "source": source, "shapes": {"layers": config.num_hidden_layers,
                                                                          "prefill": prefill, "decode": decode},
           "limits": lim.as_dict(), "method": METHOD.as_dict(), "results": results, "goals": goals,
           "load": {"start": load_start, "end": os.getloadavg()[0], "rounds": loads}}
    write_output_file(stem.with_suffix(".json"), json.dumps(doc, indent=2, default=str) + "\n", force=force, option="--out")
    write_output_file(stem.with_suffix(".md"), markdown(doc), force=force, option="--out")
    return doc


def markdown(doc: dict) -> str:
    m, lim = doc["machine"], doc["limits"]
    lines = [f"# `quant-full` — the whole {doc['shapes']['layers']}-layer {doc['source']} in int4, decode — {m['cpu']} "
             f"({m['cores']} cores)", "",
             f"- **Machine**: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}), {m['memory_gb']} GiB; "
             f"{m['threads']} threads. Load average {doc['load']['start']:.2f} at start, {doc['load']['end']:.2f} at end "
             "(shared machine).",
             f"- **Read bandwidth measured in this run** (the faster of a measurement before and one after the rounds): "
             f"{lim['bandwidth_gbs']:.2f} GB/s.",
             f"- **Case**: greedy decode of {doc['shapes']['decode']} tokens after a {doc['shapes']['prefill']}-token "
             f"prompt, per token, {len(doc['load']['rounds'])} rounds with the backends in turn (each loads its model, "
             "is timed and lets go of it); per round ORT is the median of 2–3 decode runs after a warm-up one, "
             "llama.cpp llama-bench's mean of 2 repetitions (`-n N -d P -r 2`, its own warm-up); the table shows "
             "the median over rounds.",
             "- **Floor** = bytes the backend reads per token in its own format (all non-routed weights, the 6 "
             "routed experts of each MoE layer, lm_head, KV cache) ÷ bandwidth.", "",
             "| backend | per token | tokens/s | bytes/token | floor | of floor |", "|---|---|---|---|---|---|"]
    for name, r in doc["results"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']}: {r.get('reason', '')} | | | | |")
            continue
        f = r["floor"]
        lines.append(f"| {name} | {r['latency_s'] * 1e3:.1f} ms | {r['tokens_per_s']:.2f} | {f['bytes'] / 1e9:.2f} GB | "
                     f"{f['memory_s'] * 1e3:.1f} ms | {r['floor_fraction']:.0%} |")
    lines += ["", "## Goals", ""]
    for g in doc["goals"]:
        v = g["value"]
        shown = "—" if v is None else (f"{v:.0%}" if "floor" in g["goal"] else f"{v:.2f}×")
        lines.append(f"- {g['goal']}: {'not measured' if g['met'] is None else 'met' if g['met'] else '**missed**'} ({shown})")
    a = doc["results"]["ort-int4"]
    e = a["export"]
    lines += ["", "## Rounds (per token)", "", "| round | load | ort-int4 | llama.cpp-q4_0 |", "|---|---|---|---|"]
    lr = doc["results"].get("llama.cpp-q4_0", {}).get("rounds", [])
    for i, r in enumerate(a["rounds"]):
        ll = f"{lr[i]['per_token_s'] * 1e3:.1f} ms" if i < len(lr) else "—"
        lines.append(f"| {i + 1} | {doc['load']['rounds'][i]:.2f} | {r['per_token_s'] * 1e3:.1f} ms | {ll} |")
    r0 = a["rounds"][0]
    lines += ["", "## The export", "",
              f"- {e['model_bytes'] / 2**30:.2f} GiB on disk; export {sum(e['seconds'].values()):.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in e['seconds'].items())}); peak RSS "
              f"{e['quant']['peak_rss_bytes'] / 2**30:.2f} GiB (streamed: {e['quant']['streamed']}).",
              f"- exactness: {e['quant']['exactness']['summary']}",
              f"- vs the unquantized model: {json.dumps({k: v for k, v in e['quant']['quality'].items() if k != 'routing_drift'})}",
              f"- ORT session load {r0['session_load_s']:.1f} s, prefill of {doc['shapes']['prefill']} tokens "
              f"{r0['prefill_s']:.2f} s, RSS with the session {r0['rss_bytes'] / 2**30:.2f} GiB."]
    return "\n".join(lines) + "\n"
