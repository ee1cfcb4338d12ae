"""The expert report as rich tables (``dsmoe experts`` and ``dsmoe generate --router-stats``)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ids(ids: list[int], most: int = 6) -> str:
    if not ids:
        return "-"
    shown = ", ".join(map(str, ids[:most]))
    return f"{len(ids)}: {shown}" + (" …" if len(ids) > most else "")


def render(doc: dict, console: Console) -> None:
    """Print the per-layer load table, then the comparison and placement tables when present."""
    E, K = doc["experts"], doc["top_k"]
    t = Table(title=f"expert load: {doc['source']} ({doc['backend']}), {doc['tokens']} tokens"
                    + (f" from {doc['prompts']} prompts" if "prompts" in doc else "") + f", top-{K} of {E} experts",
              box=box.SIMPLE_HEAD)
    for col in ("layer", "max/mean", "CV", "entropy", "never chosen", "shared share"):
        t.add_column(col, justify="left" if col == "never chosen" else "right")
    x = Table(title="experts: busiest (share of slots), most co-chosen pairs (share of tokens), range of the experts' mean routing weight",
              box=box.SIMPLE_HEAD)
    for col in ("layer", "busiest", "top pairs", "mean weights"):
        x.add_column(col, justify="right" if col == "layer" else "left", no_wrap=True)
    for s in doc["layers"]:
        busiest = sorted(range(E), key=lambda e: (-s["counts"][e], e))[:3]
        weights = [w for w in s["mean_weight"] if w is not None]
        share = "-" if s["shared_share"] is None else _pct(s["shared_share"])
        t.add_row(str(s["layer"]), f"{s['max_over_mean']:.2f}", f"{s['cv']:.2f}", f"{s['entropy']:.3f}",
                  _ids(s["never_chosen"], 4), share)
        x.add_row(str(s["layer"]), " ".join(f"{e}:{_pct(s['load'][e])}" for e in busiest),
                  " ".join(f"{p['experts'][0]}+{p['experts'][1]}:{_pct(p['fraction'])}" for p in s["top_pairs"][:2]),
                  f"{min(weights):.3g}–{max(weights):.3g}")
    console.print(t)
    console.print(x)
    console.print(f"[dim]max/mean: busiest expert over the mean (1 = balanced, {E / K:.3g} = all tokens on {K} "
                  f"experts); CV: std/mean of the counts; entropy of the load / ln E (1 = uniform); shared share: "
                  f"Σ‖shared‖ / Σ(‖routed‖ + ‖shared‖) of the MoE output; every number per expert: --json[/dim]")
    if "compare" in doc:
        c = doc["compare"]
        t = Table(title=f"routing drift: {doc['source']} ({doc['backend']}, {doc['dtype']}) vs {c['source']} "
                        f"({c['backend']}, {c['dtype']})",
                  box=box.SIMPLE_HEAD)
        for col in ("layer", "tokens", "expert set changed", "mean overlap", "top-1 changed"):
            t.add_column(col, justify="right")
        for s in c["layers"]:
            t.add_row(str(s["layer"]), str(s["tokens"]), _pct(s["changed"]), _pct(s["overlap"]), _pct(s["top1_changed"]))
        t.add_row("mean", "", _pct(c["mean_changed"]), _pct(c["mean_overlap"]), "")
        console.print(t)
    if "placement" in doc:
        p = doc["placement"]
        t = Table(title=f"placement on {p['devices']} devices ({'/'.join(map(str, sorted(set(p['capacities']))))} "
                        f"experts each): busiest device / mean", box=box.SIMPLE_HEAD)
        for col in ("layer", "contiguous", "proposed", "bound", "slots per device (proposed)"):
            t.add_column(col, justify="left" if col.startswith("slots") else "right")
        for s in p["layers"]:
            t.add_row(str(s["layer"]), f"{s['contiguous_max_over_mean']:.3f}", f"{s['max_over_mean']:.3f}",
                      f"{s['lower_bound_max_over_mean']:.3f}", " ".join(map(str, s["device_load"])))
        console.print(t)
        st = p["step_slots"]
        console.print(f"[dim]{p['method']}; a step waits for each layer's busiest device: Σ max = "
                      f"{st['contiguous']} slots contiguous → {st['proposed']} proposed (ideal {st['ideal']:.0f}), "
                      f"{p['speedup_vs_contiguous']:.2f}× · assignment: --json[/dim]")
    if "plot" in doc:
        console.print(f"[dim]plot: {doc['plot']['path']} ({doc['plot']['bytes']:,} bytes)[/dim]")
