"""``mla-decode``: what the absorbed MLA form and its latent cache buy, on DeepSeek-V2-Lite cut to 2
layers (layer 0 dense, layer 1 MoE; real width, heads, latent and vocabulary), CPU, fp32.

- KV cache per token, expanded (per-head keys and values: ``heads · (d_nope + d_rope + d_v)``
  values per layer) vs latent (``kv_lora_rank + d_rope``), from :func:`dsmoe.architecture.kv_cache_report`.
- Decode latency per token (one step, S = 1) at contexts 128, 1024 and 4096, on a seeded random
  latent cache of that length (the same for every backend; a prefill of 4096 tokens is not what is
  measured), for:

  ========================  ================================================================
  ``eager``                 the reference model: expands the whole latent cache through
                            ``kv_b_proj`` at every step, as transformers does
  ``fused-expanded``        the fused graph without ``absorb_mla`` (MoE fused, attention expanded)
  ``fused``                 the fused graph with ``absorb_mla``: ``dsmoe::mla_attention`` CPU kernel
  ``ort-expanded``          ``dsmoe-export --no-absorb-mla`` in ONNX Runtime
  ``ort``                   ``dsmoe-export`` (absorbed) in ONNX Runtime
  ========================  ================================================================

  All read the latent cache (the artifacts' contract, :mod:`dsmoe.cache`); "expanded" is how the
  attention is computed from it. Every backend's logits are checked against eager before timing;
  cases are timed with the backends interleaved (ratios from the same minutes).

Run ``python -m dsmoe.bench.mla_decode [--quick] [--out DIR]`` (``make bench-mla``); results go to
``<out>/<machine>-mla-decode.{json,md,png}``. Memory: the two ONNX exports run first, each in a
child process (``dsmoe-export``), so their peak is returned before the model is built here;
``fused`` shares every weight with ``fused-expanded``, whose stacked experts the eager model views.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch
from dsmoe.bench.backends import share_expert_weights
from dsmoe.bench.limits import Limits, floor_s, measure_limits, model_step_work
from dsmoe.bench.report import check_result_paths, machine_info, result_paths, save_plot, versions
from dsmoe.bench.timing import FULL, QUICK, Method, cross_check, measure
from dsmoe.export import OrtDecoder
from dsmoe.passes.absorb_mla import absorb_mla
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline

import dsmoe
from dsmoe.architecture import kv_cache_report
from dsmoe.cache import cache_layout
from dsmoe.children import run_child
from dsmoe.dtypes import BENCH_RTOL
from dsmoe.ir import capture, op_histogram
from dsmoe.outputs import write_output_file

SUITE = "mla-decode"
BACKENDS = ("eager", "fused-expanded", "fused", "ort-expanded", "ort")
SIZES = {False: dict(source="preset:deepseek-v2-lite", overrides={"num_hidden_layers": 2}, contexts=[128, 1024, 4096]),
         True: dict(source="preset:mla-tiny", overrides={"num_hidden_layers": 2}, contexts=[16, 64])}
SEED = 0
DEFAULT_OUT = Path("out/bench")  # never the source tree; `--out benchmarks/results` to commit a run


def run_mla_decode(*, quick: bool = False, backends: tuple[str, ...] | list[str] = BACKENDS, out_dir: str | Path | None = None,
                   threads: int | None = None, method: Method | None = None, limits: Limits | None = None,
                   source: str | None = None, overrides: dict | None = None, contexts: list[int] | None = None,
                   write: bool = True, progress: Callable[[str], None] = print, force: bool = False) -> dict:
    """Run the benchmark; returns the result document (and writes it unless ``write`` is False).

    Two phases, so that the eager model and the ONNX Runtime sessions (each about the model's size)
    are never all in memory: *torch* (eager, fused-expanded, fused, interleaved case by case; the
    eager logits are kept as the reference), then *ort* (ort-expanded and ort, interleaved, checked
    against those logits). Absorbed-vs-expanded ratios are within a phase; ORT-vs-eager ratios are
    across the two (minutes apart; the load at each phase is recorded)."""
    size = dict(SIZES[quick])
    size.update({k: v for k, v in (("source", source), ("overrides", overrides), ("contexts", contexts)) if v is not None})
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise dsmoe.DsmoeError(f"unknown backend {unknown[0]!r} (backends: {', '.join(BACKENDS)})")
    backends = ["eager", *[b for b in backends if b != "eager"]]
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    meth = method or (QUICK if quick else FULL)
    load = {"start": os.getloadavg()[0]}
    tmp = Path(tempfile.mkdtemp(prefix="dsmoe-mla-bench-"))  # on disk: the exports are GBs
    try:
        exports = {}
        for name, absorbed in (("ort-expanded", False), ("ort", True)):
            if name in backends:
                progress(f"[{SUITE}] dsmoe-export ({'absorbed' if absorbed else 'expanded'} attention)")
                exports[name] = _export(size, tmp / name, absorbed)
        progress(f"[{SUITE}] measuring this machine's bandwidth and GEMM rate")
        lim = limits or measure_limits(quick=quick)
        progress(f"[{SUITE}] building {size['source']} {size['overrides']}")
        model = dsmoe.load(size["source"], overrides=size["overrides"], dtype="float32", seed=SEED)
        config, params = model.config, sum(p.numel() for p in model.parameters())
        fns, notes = _prepare_torch(model, backends, progress)
        inputs = {P: _inputs(config, P) for P in size["contexts"]}
        cases, refs = [], {}
        load["torch"] = os.getloadavg()[0]
        for P, args in inputs.items():
            with torch.inference_mode():
                refs[P] = fns["eager"](*args)[0]
            cases.append(_case(config, P, args, refs[P], fns, meth, lim, progress))
        del model, fns
        gc.collect()
        ort_fns = {}
        for name, path in exports.items():
            ort_fns[name] = OrtDecoder(path, threads=threads)
            shutil.rmtree(path, ignore_errors=True)  # the session holds its own copy
            notes[name] = {"what": f"ONNX Runtime CPU EP, dsmoe-export{' --no-absorb-mla' if name == 'ort-expanded' else ''}",
                           "threads": threads}
        load["ort"] = os.getloadavg()[0]
        for case, (P, args) in zip(cases, inputs.items()):
            _time_into(case, args, refs[P], ort_fns, meth, progress)
        for case in cases:
            _ratios(case)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load["end"] = os.getloadavg()[0]
    c = config
    doc = {"suite": SUITE, "quick": quick, "created": _dt.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(threads), "versions": versions(), "dtype": "fp32", "seed": SEED,
           "shapes": {"source": size["source"], "overrides": size["overrides"], "layers": c.num_hidden_layers,
                      "moe_layers": c.moe_layers, "H": c.hidden_size, "heads": c.num_attention_heads,
                      "kv_lora_rank": c.kv_lora_rank, "qk_nope": c.qk_nope_head_dim, "qk_rope": c.qk_rope_head_dim,
                      "v": c.v_head_dim, "q_lora_rank": c.q_lora_rank, "V": c.vocab_size, "E": c.n_routed_experts,
                      "K": c.num_experts_per_tok, "batch": 1, "contexts": size["contexts"], "model_params": params},
           "kv_cache": {"fp32": kv_cache_report(c, torch.float32), "bf16": kv_cache_report(c, torch.bfloat16)},
           "method": meth.as_dict(), "limits": lim.as_dict(), "backends": notes, "cases": cases, "load": load}
    if write:
        doc["files"] = [str(p) for p in write_files(doc, Path(out_dir) if out_dir else DEFAULT_OUT, force=force)]
    return doc


def _export(size: dict, out: Path, absorbed: bool) -> Path:
    """``dsmoe-export`` in a child process (its peak memory is returned before timing)."""
    argv = [size["source"], "--out", str(out), "--target", "ort", "--dtype", "fp32"]
    for k, v in size["overrides"].items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    if not absorbed:
        argv.append("--no-absorb-mla")
    proc = run_child([sys.executable, "-c", "from dsmoe.app.cli import export_main; export_main()", *argv],
                          capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"dsmoe-export exited {proc.returncode}: {tail[0]}")
    return out


def _prepare_torch(model, backends, progress) -> tuple[dict, dict]:
    fns, notes = {"eager": lambda *a: model(*a, use_cache=True)}, {"eager": {"what": "reference model (expanded)"}}
    if "fused-expanded" in backends or "fused" in backends:
        progress(f"[{SUITE}] capture + passes")
        expanded, _ = run_pipeline(capture(model), PassContext(absorb_mla=False))
        share_expert_weights(model, expanded)  # one copy of the experts: the fused graph's stacked ones
        if "fused-expanded" in backends:
            fns["fused-expanded"] = expanded
            notes["fused-expanded"] = {"what": "fused graph, attention expanded", "ops": _fused_ops(expanded)}
        if "fused" in backends:
            # the same graph, absorbed: a copy sharing every weight (memo), rewritten by the pass
            memo = {id(t): t for t in [*expanded.parameters(), *expanded.buffers()]}
            with warnings.catch_warnings():  # deepcopy of a GraphModule warns about pytree internals
                warnings.simplefilter("ignore", FutureWarning)
                absorbed = copy.deepcopy(expanded, memo)
            rewrites = absorb_mla(absorbed, PassContext()).rewrites
            fns["fused"] = absorbed
            notes["fused"] = {"what": "fused graph, absorb_mla (dsmoe::mla_attention)", "absorb_mla_rewrites": rewrites,
                              "ops": _fused_ops(absorbed)}
    return fns, notes


def _fused_ops(gm) -> dict:
    return {k: v for k, v in op_histogram(gm).items() if k.startswith("dsmoe::") or k in ("aten.matmul", "aten.softmax")}


def _inputs(config, P: int) -> tuple:
    """One decode step at context P: a token, the mask, its position and a seeded random latent cache."""
    g = torch.Generator().manual_seed(1000 + P)
    tok = torch.randint(0, config.vocab_size, (1, 1), generator=g)
    return tok, torch.ones(1, P + 1, dtype=torch.int64), torch.tensor([[P]]), cache_layout(config).random(1, P, g)


def _case(config, P: int, args, ref, fns: dict, meth: Method, lim: Limits, progress) -> dict:
    work = model_step_work(config, 1, P, [config.num_experts_per_tok] * len(config.moe_layers))
    out = {"case": f"decode @ {P}", "context": P, "work": {"bytes": work.bytes, "flops": work.flops},
           "floor": floor_s(work, lim), "results": {}}
    _time_into(out, args, ref, fns, meth, progress)
    return out


def _time_into(case: dict, args, ref, fns: dict, meth: Method, progress) -> None:
    """Check each backend's logits against ``ref``, then time it (backends interleaved)."""
    for name, fn in fns.items():
        with torch.inference_mode():
            chk = cross_check(fn(*args)[0], ref, rtol=BENCH_RTOL[torch.float32])
        if not chk.ok:
            case["results"][name] = {"status": "mismatch", "reason": chk.detail, "check": chk.as_dict()}
            progress(f"[{SUITE}] {case['case']} {name}: output mismatch vs eager, not timed ({chk.detail})")
            continue
        progress(f"[{SUITE}] {case['case']} {name}: timing")
        t = measure(lambda fn=fn: fn(*args), meth)
        case["results"][name] = {"status": "ok", "check": chk.as_dict(), "timing": t.as_dict(), "latency_s": t.median_s,
                                 "floor_fraction": case["floor"]["floor_s"] / t.median_s}


def _ratios(case: dict) -> None:
    res = case["results"]
    for name, r in res.items():
        if r["status"] != "ok":
            continue
        r["vs_eager"] = res["eager"]["latency_s"] / r["latency_s"]
        base = res.get(f"{name}-expanded") if name in ("fused", "ort") else None
        if base and base["status"] == "ok":
            r["vs_expanded"] = base["latency_s"] / r["latency_s"]


# ---- output ---------------------------------------------------------------------------------

def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def markdown(doc: dict) -> str:
    m, meth, lim, kv = doc["machine"], doc["method"], doc["limits"], doc["kv_cache"]
    sh = doc["shapes"]
    lines = [f"# `{SUITE}` benchmark — {m['cpu']} ({m['cores']} cores)" + (" — quick run" if doc["quick"] else ""), "",
             f"- **Machine**: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd']) or 'no AVX flags'}), {m['memory_gb']} "
             f"GiB memory, {m['os']}; {m['threads']} threads for torch and ONNX Runtime.",
             f"- **Load**: load average {doc['load']['start']:.2f} at start, {doc['load'].get('torch', 0):.2f} when the torch "
             f"phase started, {doc['load'].get('ort', 0):.2f} when the ORT phase started, {doc['load']['end']:.2f} at end "
             "(the machine is shared; other work at the same time shows up as spread).",
             "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v),
             f"- **Model**: `{sh['source']}` with {sh['overrides']}: {sh['layers']} layers (MoE: {sh['moe_layers']}), "
             f"hidden {sh['H']}, {sh['heads']} heads, kv_lora_rank {sh['kv_lora_rank']}, qk {sh['qk_nope']} + "
             f"{sh['qk_rope']}, v {sh['v']}, vocabulary {sh['V']}, {sh['E']} experts top-{sh['K']}; "
             f"{sh['model_params'] / 1e9:.2f}B parameters, fp32, random weights (seed {doc['seed']}); batch 1.",
             "- **Case**: one decode step (1 token) after a seeded random latent cache of the given context "
             "(the same cache and token for every backend); latency per token.",
             f"- **Method**: {meth['warmup']} warm-up call(s), then timed calls until {meth['budget_s']} s of timings (at "
             f"least {meth['min_iters']}, at most {meth['max_iters']}); median, spread ± half the interquartile range; "
             "every output checked against eager's logits first. Two phases (memory: the model and two ORT sessions "
             "are never held at once): torch (eager, fused-expanded, fused) then ORT (ort-expanded, ort), each "
             "interleaved case by case; absorbed-vs-expanded ratios are within a phase, ORT-vs-eager across them.",
             f"- **Limits measured in this run**: read bandwidth {lim['bandwidth_gbs']:.2f} GB/s, fp32 GEMM "
             f"{lim['gemm_gflops']:.1f} GFLOP/s; floor = max(bytes ÷ bandwidth, FLOPs ÷ GEMM rate) with the absorbed "
             "form's FLOPs and the weights the step must read (attention, dense MLP, the K routed + shared experts, "
             "lm_head, the latent cache).", "",
             "## KV cache per token", "", "| dtype | latent (kept) | expanded per-head K/V | expanded ÷ latent |",
             "|---|---|---|---|"]
    for dt, r in kv.items():
        lines.append(f"| {dt} | {r['bytes_per_token']:,} B ({r['values_per_token_per_layer']} values × {sh['layers']} "
                     f"layers) | {r['expanded_bytes_per_token']:,} B ({r['expanded_values_per_token_per_layer']} values "
                     f"× {sh['layers']}) | {r['expanded_over_kept']:.2f}× |")
    full = kv["bf16"]["bytes_per_token"] // sh["layers"], kv["bf16"]["expanded_bytes_per_token"] // sh["layers"]
    lines += ["", f"Per layer and token in bf16: {full[0]:,} B latent vs {full[1]:,} B expanded; for the full 27-layer "
              f"V2-Lite at 4096 tokens: {27 * 4096 * full[0] / 2**20:,.0f} MiB vs {27 * 4096 * full[1] / 2**20:,.0f} MiB.",
              "", "## Decode latency per token", "",
              "| context | backend | median | spread | iters | vs eager | absorbed vs expanded | floor | of floor | check |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for case in doc["cases"]:
        for name, r in case["results"].items():
            if r["status"] != "ok":
                lines.append(f"| {case['context']} | {name} | {r['status']} | | | | | | | {r.get('reason', '')[:60]} |")
                continue
            t = r["timing"]
            vs_expanded = f"{r['vs_expanded']:.2f}×" if "vs_expanded" in r else ""
            lines.append(f"| {case['context']} | {name} | {_ms(r['latency_s'])} | ±{t['spread'] * 50:.0f}% | {t['iters']} | "
                         f"{r['vs_eager']:.2f}× | {vs_expanded} | "
                         f"{_ms(case['floor']['floor_s'])} | {r['floor_fraction'] * 100:.0f}% | "
                         f"ok ({r['check']['max_abs_err']:.0e}) |")
    lines += ["", "## Backends", ""]
    lines += [f"- `{n}`: {b['what']}" + (f"; ops {b['ops']}" if b.get("ops") else "") for n, b in doc["backends"].items()]
    return "\n".join(lines) + "\n"


def write_files(doc: dict, out_dir: Path, *, force: bool = False) -> list[Path]:
    name = f"{doc['machine']['name']}-{SUITE}" + ("-quick" if doc["quick"] else "")
    paths = result_paths(out_dir, name)
    check_result_paths(out_dir, name, force=force)
    write_output_file(paths[0], json.dumps(doc, indent=2, default=str) + "\n", force=force, option="--out")
    write_output_file(paths[1], markdown(doc), force=force, option="--out")
    write_output_file(paths[2], lambda p: _plot(doc, p), force=force, option="--out")
    return paths


def _plot(doc: dict, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend (no display here)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [c["context"] for c in doc["cases"]]
    for name in doc["backends"]:
        pts = [(c["context"], c["results"][name]["latency_s"] * 1e3) for c in doc["cases"]
               if c["results"].get(name, {}).get("status") == "ok"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if "expanded" in name or name == "eager" else "-")
    ax.plot(xs, [c["floor"]["floor_s"] * 1e3 for c in doc["cases"]], "k:", label="floor (this machine)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (cached tokens)")
    ax.set_ylabel("decode latency per token (ms)")
    ax.set_title(f"{SUITE}: {doc['shapes']['source']} {doc['shapes']['overrides']}, {doc['machine']['cpu']}", fontsize=9)
    save_plot(fig, ax, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="mla-tiny, contexts 16 and 64, few iterations")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    p.add_argument("--backend", action="append", choices=BACKENDS, help="restrict to these backends (repeatable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace results files of an earlier run")
    a = p.parse_args(argv)
    doc = run_mla_decode(quick=a.quick, backends=a.backend or BACKENDS, out_dir=a.out, threads=a.threads, force=a.force)
    print(markdown(doc))
    print("wrote", ", ".join(doc["files"]))


if __name__ == "__main__":
    main()
