"""The peer comparison's goals and its Markdown table (:mod:`dsmoe.bench.peer`)."""

from __future__ import annotations

# AMD families/models → microarchitecture (what /proc/cpuinfo says; the model name of a VM often does not)
_UARCH = {(25, m): "Zen 4" for m in (*range(0x10, 0x20), *range(0x60, 0x80), *range(0xA0, 0xB0))}
_UARCH.update({(25, m): "Zen 3" for m in (*range(0x00, 0x10), *range(0x20, 0x60))})
_UARCH.update({(23, m): "Zen 2" for m in range(0x30, 0x80)})
_UARCH.update({(26, m): "Zen 5" for m in range(0x00, 0x80)})

BEST_4BIT = ("llama.cpp-Q4_0", "llama.cpp-Q4_K_M", "llama.cpp-dsmoe-Q4_0")


def machine_label(m: dict) -> str:
    """E.g. ``AMD EPYC (Zen 4) 2-core VM, AVX-512/VNNI``: the CPU, its cores and the widest ISA it runs."""
    fam = m.get("family")
    uarch = _UARCH.get(tuple(fam)) if fam else None
    simd = set(m.get("simd", []))
    isa = ("AVX-512/VNNI" if "avx512_vnni" in simd else "AVX-512" if "avx512f" in simd
           else "AVX2" if "avx2" in simd else "no AVX2")
    if "amx_tile" in simd:
        isa += "/AMX"
    return f"{m['cpu']}{f' ({uarch})' if uarch else ''} {m['cores']}-core{' VM' if m.get('vm') else ''}, {isa}"


def _lat(doc, name, case):
    r = doc["results"].get(name)
    return r["cases"][case]["latency_s"] if r else None


def peer_goals(doc: dict) -> list[dict]:
    """int4 ≥ 1.2× llama.cpp's fastest 4-bit GGUF on every case; int8 ≥ 1.2× Q8_0; int4 decode ≥ 70%
    of its memory floor."""
    cases = [f"prefill {P}" for P in doc["shapes"]["prefill"]] + [f"decode @{C}" for C in doc["shapes"]["context"]]
    out = []

    def goal(text, values, target, pct=False):
        if not values or any(v is None for _, v in values):
            return {"goal": text, "met": None, "value": None, "detail": "not measured"}
        worst = min(values, key=lambda cv: cv[1])
        fmt = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.2f}×")
        return {"goal": text, "met": worst[1] >= target, "value": worst[1],
                "detail": ", ".join(f"{c}: {fmt(v)}" for c, v in values) + f"; worst {worst[0]} (target {fmt(target)})"}

    def vs(c, peers, own):
        got = [x for x in (_lat(doc, p, c) for p in peers) if x]
        mine = _lat(doc, own, c)
        return (min(got) / mine, min(peers, key=lambda p: _lat(doc, p, c) or float("inf"))) if got and mine else (None, None)

    vals = [(c, vs(c, BEST_4BIT, "ort-int4")[0]) for c in cases]
    out.append(goal("ort-int4 ≥ 1.2× llama.cpp's fastest 4-bit GGUF (prefill 128/512, decode @128/2048)", vals, 1.2))
    out[-1]["peer"] = {c: vs(c, BEST_4BIT, "ort-int4")[1] for c in cases}
    out.append(goal("ort-int8 ≥ 1.2× llama.cpp Q8_0", [(c, vs(c, ("llama.cpp-Q8_0",), "ort-int8")[0]) for c in cases], 1.2))
    r = doc["results"].get("ort-int4")
    dec = [c for c in cases if c.startswith("decode")]
    out.append(goal("ort-int4 decode ≥ 70% of its memory floor",
                    [(c, r["cases"][c]["floor_fraction"] if r else None) for c in dec], 0.7, pct=True))
    return out


def markdown(doc: dict) -> str:
    m, lim, sh, ld = doc["machine"], doc["limits"], doc["shapes"], doc["load"]
    cases = [f"prefill {P}" for P in sh["prefill"]] + [f"decode @{C}" for C in sh["context"]]
    lines = [f"# `{doc['suite']}` — dsmoe vs llama.cpp on {machine_label(m)}", "",
             f"- **Machine**: {machine_label(m)} (`{m['cpu']}`, family/model {m.get('family')}), ISA flags "
             f"{', '.join(m['simd'])}; {m['memory_gb']} GiB; {m['threads']} threads for every contender.",
             f"- **Load average**: {ld['start']:.2f} at start, {ld['end']:.2f} at end; at each round's start "
             f"{', '.join(f'{x:.2f}' for x in ld.get('rounds', []))} (the machine is shared: compare within this run).",
             f"- **Workload**: `deepseek-moe-16b` cut to {sh['layers']} layers ({sh['moe_layers']} MoE), random bf16 "
             f"weights (`{doc['checkpoint']}`), batch 1. Prefill of {', '.join(map(str, sh['prefill']))} tokens; decode "
             f"of {sh['decode']} tokens after a context of {', '.join(map(str, sh['context']))}, per token. "
             f"{sh['rounds']} rounds, contenders in turn (order rotated each round); medians over rounds. Per round: "
             f"ORT 1 warm-up + median of 2 calls per case, llama-bench `-r {sh.get('llama_reps', 2)}` (its mean).",
             f"- **Limits measured in this run** (better of before/after): read bandwidth {lim['bandwidth_gbs']:.1f} GB/s, "
             f"fp32 GEMM {lim['gemm_gflops']:.0f} GFLOP/s, int8 GEMM {lim['int8_gemm_gops']:.0f} GOP/s (`torch._int_mm`).",
             "- **Floors**: decode = bytes the contender reads per token in its own format ÷ bandwidth; prefill = "
             "2 · tokens · active weights (+ attention) ÷ the int8 (fp32) GEMM rate.",
             f"- **Versions**: {', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}; llama-bench `{doc['llama_bench']}`.",
             "", "| contender | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    busy = max([ld["start"], ld["end"], *ld.get("rounds", [])])
    if busy > m["cores"]:
        lines[-3:-3] = [f"- **Busy machine**: load average up to {busy:.1f} on {m['cores']} cores. Other processes held the "
                        "cores, and a thread pool that spin-waits at its barriers (llama.cpp's default, `--poll 50`) loses "
                        "far more to that than one whose threads sleep (dsmoe's ONNX Runtime sessions): these ratios say how "
                        "each degrades on a busy machine, not how they compare on a quiet one."]
    for n, r in doc["results"].items():
        cells = []
        for c in cases:
            e = r["cases"][c]
            x = f"{e['latency_s'] * 1e3:.1f} ms"
            x += (f" ({e['floor_fraction']:.0%} of floor)" if c.startswith("decode")
                  else f" ({e['of_int8_peak']:.0%} of int8 peak)")
            cells.append(x)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (a contender's latency ÷ ort-int4's / ÷ ort-int8's; > 1: dsmoe faster):", "",
              "| vs | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for own, peers in (("ort-int4", [p for p in doc["results"] if p.startswith("llama") and "Q8" not in p]),
                       ("ort-int8", ["llama.cpp-Q8_0"])):
        for p in peers:
            if p in doc["results"] and own in doc["results"]:
                lines.append(f"| {p} / {own} | " + " | ".join(f"{_lat(doc, p, c) / _lat(doc, own, c):.2f}×" for c in cases) + " |")
    lines += ["", "## Goals", ""]
    for g in doc["goals"]:
        state = "not measured" if g["met"] is None else "met" if g["met"] else "**missed**"
        lines.append(f"- {g['goal']}: {state} — {g['detail']}")
    if doc["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in doc["skipped"].items()]
    lines += ["", "## Contenders", ""]
    for n, r in doc["results"].items():
        if r["kind"] == "ort":
            e = r["export"]
            q = e["quality"]
            lines.append(f"- `{n}`: `dsmoe-export --quant {n.split('-')[1]}`, {e['model_bytes'] / 2**30:.2f} GiB; "
                         f"exactness {e['exactness']}; vs unquantized: top-1 {q.get('top1_agreement', 0):.1%}, "
                         f"mean KL {q.get('mean_kl', 0):.3g}; session load {statistics_median(r, 'load_s'):.1f} s.")
        else:
            d = r["cases"][cases[-1]]
            lines.append(f"- `{n}`: `{r['path']}`, {r['gguf_bytes'] / 2**30:.2f} GiB; {d['bytes_per_token'] / 1e6:.0f} MB read "
                         f"per token at context {sh['context'][-1]}.")
    lines += ["", "## Rounds", "", "| contender | round | " + " | ".join(cases) + " |", "|---|---|" + "---|" * len(cases)]
    for n, r in doc["results"].items():
        for i, x in enumerate(r["rounds"]):
            lines.append(f"| {n} | {i + 1} | " + " | ".join(f"{x[c] * 1e3:.1f} ms" for c in cases) + " |")
    return "\n".join(lines) + "\n"


def statistics_median(r: dict, key: str) -> float:
    vals = sorted(x[key] for x in r["rounds"] if key in x)
    return vals[len(vals) // 2] if vals else float("nan")
