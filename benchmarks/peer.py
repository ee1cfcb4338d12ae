"""dsmoe against llama.cpp on the CPU, as users run both (``dsmoe bench --suite quant``).

The workload is ``deepseek-moe-16b`` cut to ``layers`` layers (default 4: 1 dense + 3 MoE at full
width, 102400 vocabulary, random bf16 weights), where decode is dominated by the MoE layers rather
than the lm_head. Contenders, all from the same checkpoint (:mod:`dsmoe.bench.peer_artifacts`):

- ``ort-int4``, ``ort-int8``: ``dsmoe-export --quant`` run by :class:`dsmoe.export.OrtDecoder`;
- ``llama.cpp-Q4_0``, ``llama.cpp-Q4_K_M``, ``llama.cpp-Q8_0``: llama.cpp's own converter +
  ``llama-quantize`` (its default mixes), timed by its own ``llama-bench``;
- ``llama.cpp-dsmoe-Q4_0``: dsmoe's GGUF writer (Q4_0 for every linear, llama-quantize's ``--pure``).

Cases: prefill of 128 and 512 tokens from an empty cache; decode of ``decode`` tokens after a
context of 128 and 2048 tokens, per token. ORT decodes greedily from a seeded random KV cache of
the context's length (the work per token is the same as after a real prompt), llama-bench
processes a real context (``-d``) untimed first. Rounds: every contender in turn, the order rotated
each round, so load on the shared machine falls on all alike; the table shows medians over rounds.

Limits measured in the same run, before and after the rounds (the better of the two): read
bandwidth and the fp32 and int8 GEMM rates (:mod:`dsmoe.bench.limits`). Decode floor = the bytes
a contender reads per token in its own format (for a GGUF: every tensor's stored bytes, the
routed experts at K/E of their stack, one embedding row, the f16 KV cache; for ORT: the export's
bytes per weight, the fp32 KV cache) ÷ bandwidth. Prefill is reported against the GEMM rates:
2 · tokens · active weights (+ attention) ÷ rate.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
from dsmoe.bench import peer_artifacts as art
from dsmoe.bench.limits import measure_int8_gemm_rate, measure_limits, model_step_work
from dsmoe.bench.llama_cpp import find_llama_bench, run_llama_bench_tests
from dsmoe.bench.peer_report import markdown, peer_goals
from dsmoe.bench.report import SCHEMA, machine_info, versions
from dsmoe.export import OrtDecoder
from dsmoe.export.quant_report import linear_bytes_per_weight

import dsmoe

PREFILL = (128, 512)
CONTEXT = (128, 2048)
DECODE = 16


def _ort_round(export_dir: Path, config, threads: int, prefill, context, decode: int) -> dict:
    """One round of an ORT export: load, then each prefill and decode case (1 warm-up, median of 2)."""

    t = time.perf_counter()
    # as `dsmoe generate` runs it: the lm_head on the last token, the keys/values written in place
    dec = OrtDecoder(export_dir, threads=threads, logits="last", kv_inplace=True)
    out = {"load_s": time.perf_counter() - t, "spinning": dec.spinning}  # spinning: chosen at load (cores_free)
    g = torch.Generator().manual_seed(0)
    nkv, hd, L = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    for P in prefill:
        ids = torch.randint(0, config.vocab_size, (1, P), generator=g)
        empty = [(torch.zeros(1, nkv, 0, hd),) * 2 for _ in range(L)]
        args = (ids, torch.ones(1, P, dtype=torch.int64), torch.arange(P)[None], empty)
        out[f"prefill {P}"] = _median_of(lambda a=args: dec(*a), reps=2)
    for C in context:
        past = [tuple(torch.randn(1, nkv, C, hd, generator=g) for _ in range(2)) for _ in range(L)]
        tok0 = torch.randint(0, config.vocab_size, (1, 1), generator=g)

        def run(past=past, C=C, tok0=tok0):
            kv, tok = past, tok0
            for i in range(decode):
                logits, kv = dec(tok, torch.ones(1, C + i + 1, dtype=torch.int64), torch.full((1, 1), C + i), kv)
                tok = logits[:, -1:].argmax(-1)

        out[f"decode @{C}"] = _median_of(run, reps=2) / decode
    return out  # the session goes with this frame


def _median_of(fn, reps: int) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _llama_round(gguf: Path, threads: int, prefill, context, decode: int, reps: int = 2) -> dict:
    pp = run_llama_bench_tests(gguf, threads=threads, prompts=list(prefill), gens=[0], depths=[0], reps=reps)
    tg = run_llama_bench_tests(gguf, threads=threads, prompts=[0], gens=[decode], depths=list(context), reps=reps)
    out = {f"prefill {t['n_prompt']}": t["avg_ns"] / 1e9 for t in pp if t["n_prompt"]}
    out.update({f"decode @{t['n_depth']}": t["avg_ns"] / 1e9 / t["n_gen"] for t in tg if t["n_gen"]})
    return out


def gguf_bytes_per_token(path: Path, config, context: int) -> float:
    """Bytes a GGUF model reads per decoded token: every tensor's stored bytes, the routed-expert
    stacks at K/E, one embedding row, plus the f16 KV cache of ``context`` tokens."""
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(str(path)).tensors:
        n = float(t.n_bytes)
        if t.name.startswith("token_embd"):
            n /= config.vocab_size
        elif "_exps" in t.name:
            n *= config.num_experts_per_tok / config.n_routed_experts
        total += n
    return total + 2 * 2 * config.num_key_value_heads * config.head_dim * context * config.num_hidden_layers


def ort_bytes_per_token(report: dict, config, context: int) -> float:

    hits = [config.num_experts_per_tok] * len(config.moe_layers)
    return model_step_work(config, 1, context, hits, weight_bytes=linear_bytes_per_weight(report["quant"])).bytes


def run_peer(*, layers: int = 4, threads: int | None = None, rounds: int = 3, out_dir: str | Path | None = None,
             progress=print, prefill=PREFILL, context=CONTEXT, decode: int = DECODE, cache: Path = art.CACHE,
             suite: str = "quant", preset: str = "deepseek-moe-16b", bits: tuple[int, ...] = (4, 8),
             llama_types: tuple[str, ...] = art.LLAMA_QTYPES, dsmoe_gguf: bool = True, llama_reps: int = 2) -> dict:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    load = {"start": os.getloadavg()[0]}
    say = progress
    ckpt = art.checkpoint(layers, say, cache, preset)
    config = dsmoe.load_config(ckpt)
    contenders: dict[str, dict] = {}
    for b in bits:
        d = art.export(ckpt, b, say)
        report = json.loads((d / "export_report.json").read_text())
        contenders[f"ort-int{b}"] = {"kind": "ort", "path": d, "report": report}
    skipped: dict[str, str] = {}
    exe, why = find_llama_bench()
    if exe is None:
        skipped["llama.cpp"] = why
    else:
        try:
            for q, p in art.llama_ggufs(ckpt, say, llama_types).items():
                contenders[f"llama.cpp-{q}"] = {"kind": "llama", "path": p}
        except (FileNotFoundError, RuntimeError) as e:
            skipped["llama.cpp (its converter)"] = str(e)
        if dsmoe_gguf:
            contenders["llama.cpp-dsmoe-Q4_0"] = {"kind": "llama", "path": art.dsmoe_gguf(ckpt, say)}
    say("measuring this machine's bandwidth and GEMM rates")
    lim, int8 = measure_limits(), measure_int8_gemm_rate()
    names = list(contenders)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    load["rounds"] = []
    for r in range(rounds):
        load["rounds"].append(os.getloadavg()[0])
        for n in names[r % len(names):] + names[:r % len(names)]:
            c = contenders[n]
            say(f"round {r + 1}/{rounds}: {n}")
            if c["kind"] == "ort":
                runs[n].append(_ort_round(c["path"], config, threads, prefill, context, decode))
                gc.collect()
            else:
                runs[n].append(_llama_round(c["path"], threads, prefill, context, decode, llama_reps))
        if out_dir is not None and r + 1 < rounds:  # what is measured so far survives an interrupted run
            now = load | {"end": os.getloadavg()[0]}
            part = _document(contenders, runs, config, lim, int8, now, prefill, context)
            write_peer(_wrap(part, suite, threads, ckpt, config, prefill, context, decode, r + 1, llama_reps, skipped, exe,
                             lim, int8, now), Path(out_dir))
    say("measuring the limits again (the better of the two counts)")
    lim2, int8_2 = measure_limits(), measure_int8_gemm_rate()
    if lim2.bandwidth_gbs > lim.bandwidth_gbs:
        lim.bandwidth_gbs = lim2.bandwidth_gbs
    lim.gemm_gflops = max(lim.gemm_gflops, lim2.gemm_gflops)
    int8 = max(int8, int8_2)
    load["end"] = os.getloadavg()[0]
    results = _document(contenders, runs, config, lim, int8, load, prefill, context)
    doc = _wrap(results, suite, threads, ckpt, config, prefill, context, decode, rounds, llama_reps, skipped, exe, lim, int8, load)
    if out_dir is not None:
        doc["files"] = [str(p) for p in write_peer(doc, Path(out_dir))]
    return doc


def _wrap(results, suite, threads, ckpt, config, prefill, context, decode, rounds, llama_reps, skipped, exe, lim, int8,
          load) -> dict:
    doc = {"schema": SCHEMA, "suite": suite, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "versions": versions(), "machine": machine_info(threads), "checkpoint": str(ckpt),
           "shapes": {"layers": config.num_hidden_layers, "moe_layers": len(config.moe_layers), "prefill": list(prefill),
                      "context": list(context), "decode": decode, "rounds": rounds, "llama_reps": llama_reps},
           "limits": lim.as_dict() | {"int8_gemm_gops": int8}, "load": dict(load), "results": results,
           "skipped": skipped, "llama_bench": str(exe) if exe else None}
    doc["goals"] = peer_goals(doc)
    return doc


def _document(contenders, runs, config, lim, int8, load, prefill, context) -> dict:
    """Each contender's medians over its rounds so far, with its floors."""
    results = {}
    cases = [f"prefill {P}" for P in prefill] + [f"decode @{C}" for C in context]
    for n, c in contenders.items():
        if not runs[n]:
            continue
        res = {"kind": c["kind"], "path": str(c["path"]), "rounds": runs[n], "cases": {}}
        for case in cases:
            lat = statistics.median(x[case] for x in runs[n])
            entry = {"latency_s": lat, "tokens_per_s": (int(case.split()[1]) if case.startswith("prefill") else 1) / lat}
            if case.startswith("decode"):
                C = int(case.split("@")[1])
                b = (ort_bytes_per_token(c["report"], config, C) if c["kind"] == "ort"
                     else gguf_bytes_per_token(c["path"], config, C))
                floor = b / (lim.bandwidth_gbs * 1e9)
                entry.update(bytes_per_token=b, floor_s=floor, floor_fraction=floor / lat)
            else:
                P = int(case.split()[1])
                flops = model_step_work(config, P, 0, [config.n_routed_experts] * len(config.moe_layers)).flops
                entry.update(flops=flops, of_int8_peak=flops / (int8 * 1e9) / lat, of_fp32_peak=flops / (lim.gemm_gflops * 1e9) / lat)
            res["cases"][case] = entry
        if c["kind"] == "ort":
            q = c["report"]["quant"]
            res["export"] = {"model_bytes": c["report"]["model_bytes"], "exactness": q["exactness"]["summary"],
                             "quality": {k: v for k, v in q["quality"].items() if k != "routing_drift"}}
        else:
            res["gguf_bytes"] = Path(c["path"]).stat().st_size
        results[n] = res
    return results


def write_peer(doc: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{doc['machine']['name']}-{doc['suite']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    for p, text in zip(paths, (json.dumps(doc, indent=2, default=str) + "\n", markdown(doc))):
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    return paths
