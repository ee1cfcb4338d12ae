"""Benchmark output: the machine description, the rich table, and the JSON / Markdown / PNG files.

File names: ``<machine>-<suite>.{json,md,png}`` (``-quick`` appended for ``--quick`` runs, so a
quick run never overwrites the committed full results).
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import matplotlib
import numpy
import onnx
import onnxruntime
import onnxscript
import psutil
import torch
from rich.console import Console
from rich.table import Table

import dsmoe
from dsmoe.outputs import check_output_file, write_output_file

SCHEMA = 1


def machine_info(threads: int, device=None) -> dict:
    """The CPU (and, for a CUDA run, the GPU: its name then names the result files)."""
    info = _cpu_info(threads)
    if device is not None and str(device).startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda, name=re.sub(r"[^a-z0-9]+", "-", p.name.lower()).strip("-"))
    return info


# the ISA extensions a result names (what llama.cpp's and ONNX Runtime's kernels dispatch on)
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16")


def _cpu_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        simd = sorted({f for f in (flags.group(1).split() if flags else []) if f in SIMD_FLAGS})
        vm = bool(flags) and "hypervisor" in flags.group(1).split()
        fam, mod = (re.search(rf"^{k}\s*:\s*(\d+)$", text, re.M) for k in ("cpu family", "model"))
        family = (int(fam.group(1)), int(mod.group(1))) if fam and mod else None
    except OSError:
        simd, vm, family = [], False, None
    mem = psutil.virtual_memory().total / 2**30
    cores = os.cpu_count() or 1
    name = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") + f"-{cores}c"
    return {"name": name, "cpu": cpu, "cores": cores, "threads": threads, "memory_gb": round(mem, 1),
            "simd": simd, "vm": vm, "family": family, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def versions() -> dict:
    return {"dsmoe": dsmoe.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime-genai": _genai_version()}


def _genai_version() -> str | None:
    try:
        import onnxruntime_genai  # lazy: optional dependency
    except ImportError:
        return None
    return onnxruntime_genai.__version__


def stem(doc: dict) -> str:
    return f"{doc['machine']['name']}-{doc['suite']}" + ("-quick" if doc["quick"] else "")


GOALS_NOT_JUDGED = ("goals: not judged on this run — they are defined on the suite's full default workload "
                    "(`dsmoe bench` without --quick, --preset or --set); a quick or toy run says nothing about them")


def result_paths(out_dir: Path, name: str) -> list[Path]:
    """The results files of one suite: ``name``.json, .md and .png in ``out_dir``."""
    base = Path(out_dir) / name
    return [base.with_suffix(".json"), base.with_suffix(".md"), base.with_suffix(".png")]


def check_result_paths(out_dir: Path, name: str, *, force: bool) -> None:
    """Before a benchmark runs: its results files may be written (exist only with ``force``)."""
    for p in result_paths(out_dir, name):
        check_output_file(p, force=force, option="--out")


def write_files(doc: dict, out_dir: Path, *, force: bool = False) -> list[Path]:
    """The JSON, Markdown and PNG of a suite, each written atomically (:func:`write_output_file`)."""
    paths = result_paths(out_dir, stem(doc))
    check_result_paths(out_dir, stem(doc), force=force)
    write_output_file(paths[0], json.dumps(doc, indent=2, default=str) + "\n", force=force, option="--out")
    write_output_file(paths[1], markdown(doc), force=force, option="--out")
    write_output_file(paths[2], lambda p: plot(doc, p), force=force, option="--out")
    return paths


# ---- table ----------------------------------------------------------------------------------

def _ms(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def rows(doc: dict) -> list[list[str]]:
    """One row per (case, backend that ran or was rejected); skipped backends are listed apart."""
    out = []
    for case in doc["cases"]:
        fl = case["floor"]
        for name, r in case["results"].items():
            if r["status"] == "skipped":
                continue
            if r["status"] != "ok":
                out.append([case["case"], name, r["status"], "", "", "", "", "", r.get("reason", "")[:60]])
                continue
            t = r["timing"]
            own = r.get("floor") or fl
            out.append([case["case"], name, _ms(r["latency_s"]), f"±{t['spread'] * 50:.0f}%", str(t["iters"]),
                        f"{r['vs_eager']:.2f}×" if r["vs_eager"] else "—",
                        f"{_ms(own['floor_s'])} ({own['bound'][:3]})", f"{r['floor_fraction'] * 100:.0f}%",
                        f"ok ({r['check']['max_abs_err']:.0e})" if r.get("check") else "n/a (timed by itself)"])
    return out


def skipped(doc: dict) -> list[str]:
    return [f"{n}: {b['status']} ({b['reason']})" for n, b in doc["backends"].items() if b["status"] != "ok"]


HEADERS = ["case", "backend", "median", "spread", "iters", "vs eager", "floor", "of floor", "check vs eager"]


def print_table(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    m = doc["machine"]
    where = f"{m['gpu']} ({m['sms']} SMs)" if m.get("gpu") else f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads"
    table = Table(title=f"{doc['suite']} — {where}, {doc['dtype']}")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("case", "backend", "check") else "right")
    for row in rows(doc):
        table.add_row(*row)
    console.print(table)
    for line in skipped(doc):
        console.print(f"  [dim]{line}[/]")
    if not doc.get("goals_apply", True):
        console.print(f"  [dim]{GOALS_NOT_JUDGED}[/]")
        return
    for g in doc["goals"]:
        mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "[yellow]n/a[/]"}[g["met"]]
        console.print(f"  goal: {g['goal']}: {mark} — {g['detail']}")


# ---- markdown -------------------------------------------------------------------------------

def markdown(doc: dict) -> str:
    m, v, lim, meth = doc["machine"], doc["versions"], doc["limits"], doc["method"]
    title = f"{m['gpu']}" if m.get("gpu") else f"{m['cpu']} ({m['cores']} cores)"
    gpu = (f"- **GPU**: {m['gpu']}, {m['sms']} SMs, {m['gpu_memory_gb']} GiB, CUDA {m['cuda']}; timings with CUDA "
           "events around each call, started from an idle GPU.\n") if m.get("gpu") else ""
    lines = [f"# `{doc['suite']}` benchmark — {title}" + (" — quick run" if doc["quick"] else ""), "",
             gpu + f"- **Machine**: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd']) or 'no AVX flags'}), "
             f"{m['memory_gb']} GiB memory, {m['os']}; {m['threads']} threads for torch and ONNX Runtime.",
             f"- **Load**: load average {doc['load']['start']:.2f} at start, {doc['load']['end']:.2f} at end "
             "(the machine is shared; other work running at the same time shows up as spread).",
             "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- **dtype**: {doc['dtype']}; weights random (seed {doc['seed']}).",
             "- **Shapes**: " + ", ".join(f"{k}={val}" for k, val in doc["shapes"].items() if k not in ("routing",)),
             f"- **Method**: {meth['warmup']} warm-up call(s), then timed calls until {meth['budget_s']} s of timings "
             f"(at least {meth['min_iters']}, at most {meth['max_iters']}); median and spread (± half the "
             "interquartile range, or half the range below 4 calls); the counts used are in the `iters` column. "
             "Every backend's output is checked against eager before it is timed.",
             _limits_line(lim),
             "- **Floor** of a case = max(bytes of weights touched — distinct experts the router hit — ÷ bandwidth, "
             "FLOPs ÷ GEMM rate); `of floor` = floor ÷ latency (100% = at the machine's limit).", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(doc)]
    lines += [f"\nNot run: {'; '.join(skipped(doc))}." if skipped(doc) else ""]
    lines += ["", "## Backends", ""]
    for name, b in doc["backends"].items():
        extra = f" — {b['reason']}" if b.get("reason") else ""
        prep = f", prepared in {b['prepare_s']:.1f} s" if b.get("prepare_s") is not None else ""
        lines.append(f"- `{name}` ({b['description']}): {b['status']}{prep}{extra}")
    lines += ["", "## Goals", ""]
    if not doc.get("goals_apply", True):
        lines.append(GOALS_NOT_JUDGED)
    for g in doc["goals"] if doc.get("goals_apply", True) else []:
        mark = {True: "met", False: "**missed**", None: "not measured"}[g["met"]]
        lines.append(f"- {g['goal']}: {mark} — {g['detail']}")
    lines += ["", "## Work per case", "", "| case | bytes touched | FLOPs | memory floor | compute floor | hits |",
              "|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        f = c["floor"]
        lines.append(f"| {c['case']} | {c['work']['bytes'] / 1e6:.1f} MB | {c['work']['flops'] / 1e9:.2f} G | "
                     f"{_ms(f['memory_s'])} | {_ms(f['compute_s'])} | "
                     f"{c['info'].get('hit_experts', c['info'].get('hit_experts_mean', ''))} |")
    return "\n".join(lines) + "\n"


def _limits_line(lim: dict) -> str:
    if lim.get("device", "cpu").startswith("cuda"):
        return (f"- **Limits measured in this run** on {lim['device']}: HBM bandwidth {lim['bandwidth_gbs']:.0f} GB/s "
                f"(faster of a {lim['bandwidth_bytes'] >> 30} GiB sum, bytes read, and a device-to-device copy, bytes "
                f"read + written), {lim['gemm_dtype']} GEMM {lim['gemm_gflops'] / 1e3:.0f} TFLOP/s ({lim['gemm_n']}³ "
                "torch.mm); best of several runs, CUDA events.")
    return (f"- **Limits measured in this run**: read bandwidth {lim['bandwidth_gbs']:.2f} GB/s "
            f"({lim['bandwidth_bytes'] >> 20} MiB, faster of sum and GEMV), fp32 GEMM {lim['gemm_gflops']:.1f} GFLOP/s "
            f"(faster of {lim['gemm_n']}² and 512×{lim['gemm_n']}×{4 * lim['gemm_n']} torch.mm); best of several runs. "
            "A backend can beat a floor where its kernels beat these two torch kernels.")


# ---- plot -----------------------------------------------------------------------------------

def plot(doc: dict, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend (no display here)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(doc["backends"])
    cases = doc["cases"]
    if doc["suite"] == "moe-layer":
        xs = [c["tokens"] for c in cases]
        for n in names:
            pts = [(c["tokens"], c["results"][n]["latency_s"] * 1e3) for c in cases if c["results"].get(n, {}).get("status") == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n)
        ax.plot(xs, [c["floor"]["floor_s"] * 1e3 for c in cases], "k--", label="floor (this machine)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
    else:
        width = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            vals = [(j, c["results"][n]["latency_s"] * 1e3) for j, c in enumerate(cases) if c["results"].get(n, {}).get("status") == "ok"]
            if vals:
                ax.bar([j + i * width for j, _ in vals], [v for _, v in vals], width, label=n)
        for j, c in enumerate(cases):
            ax.hlines(c["floor"]["floor_s"] * 1e3, j - 0.1, j + 0.9, colors="k", linestyles="--",
                      label="floor (this machine)" if j == 0 else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [c["case"] for c in cases])
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    m = doc["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    ax.set_title(f"{doc['suite']}: {where}, {doc['dtype']}", fontsize=10)
    save_plot(fig, ax, path)


def save_plot(fig, ax, path: Path) -> None:
    """The benchmarks' figure finish: grid, legend, layout, a 110-dpi PNG, the figure closed."""
    import matplotlib.pyplot as plt  # lazy: after the caller chose the Agg backend

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
