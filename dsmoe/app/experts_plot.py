"""``dsmoe experts --plot FILE.png``: the expert report as one picture (matplotlib, Agg backend).

Top: a layers × experts heatmap of each expert's load relative to a uniform share
(``counts[e] / (T·K/E)``: white = balanced, red = overloaded, blue = underloaded, darkest blue =
never chosen). Bottom left: the imbalance per layer (max/mean and the coefficient of variation).
Bottom right: the routing drift per layer when the report has a comparison, else the per-device
imbalance (busiest device above the mean) of the contiguous split and of the proposed placement
when it has one, else the
routing entropy per layer.
"""

from __future__ import annotations

from pathlib import Path

from dsmoe.outputs import write_output_file


def plot_report(doc: dict, path: str | Path, *, force: bool = False, inputs=()) -> dict:
    """Write the figure for an expert report to ``path`` (PNG); returns ``{"path", "bytes"}``."""
    import matplotlib  # lazy: optional dependency (only --plot draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency
    from matplotlib.colors import TwoSlopeNorm  # lazy: optional dependency

    layers = doc["layers"]
    E, K = doc["experts"], doc["top_k"]
    names = [str(s["layer"]) for s in layers]
    rel = [[c * E / (s["tokens"] * K) for c in s["counts"]] for s in layers]
    top = max(2.0, max(max(r) for r in rel))
    fig = plt.figure(figsize=(12, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[0, :])
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top),
                   interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylabel("MoE layer")
    ax.set_xlabel(f"routed expert (0…{E - 1})")
    ax.set_title(f"expert load relative to a uniform share (1 = balanced) — {doc['source']}, {doc['backend']}, "
                 f"{doc['tokens']} tokens, top-{K} of {E}")
    fig.colorbar(im, ax=ax, label="load / uniform share", fraction=0.03)

    ax = fig.add_subplot(grid[1, 0])
    x = range(len(names))
    bars = [ax.bar([i - 0.2 for i in x], [s["max_over_mean"] for s in layers], width=0.4, label="max / mean",
                   color="#c0392b"),
            ax.bar([i + 0.2 for i in x], [s["cv"] for s in layers], width=0.4, label="coefficient of variation",
                   color="#7f8c8d")]
    _label(ax, bars, "%.2f")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(list(x), names)
    ax.set_xlabel("MoE layer")
    ax.set_title("imbalance per layer (max / mean = 1: balanced)")
    ax.legend(loc="best", fontsize=8)

    ax = fig.add_subplot(grid[1, 1])
    if "compare" in doc:
        c = doc["compare"]["layers"]
        bars = [ax.bar([i - 0.2 for i in x], [100 * s["changed"] for s in c], width=0.4,
                       label="tokens with another expert set"),
                ax.bar([i + 0.2 for i in x], [100 * s["overlap"] for s in c], width=0.4, label="mean overlap |A∩B|/K")]
        _label(ax, bars, "%.1f")
        ax.set_ylabel("%")
        ax.set_title(f"routing drift vs {doc['compare']['source']} ({doc['compare']['backend']})")
    elif "placement" in doc:
        p = doc["placement"]
        bars = [ax.bar([i - 0.2 for i in x], [100 * (s["contiguous_max_over_mean"] - 1) for s in p["layers"]],
                       width=0.4, label="contiguous split", color="#95a5a6"),
                ax.bar([i + 0.2 for i in x], [100 * (s["max_over_mean"] - 1) for s in p["layers"]], width=0.4,
                       label="proposed placement", color="#27ae60")]
        _label(ax, bars, "%.1f")
        ax.set_ylabel("%")
        ax.set_title(f"busiest of {p['devices']} devices above the mean load (0 = balanced)")
    else:
        _label(ax, [ax.bar(list(x), [s["entropy"] for s in layers], color="#2980b9", label="entropy / ln E")], "%.3f")
        ax.set_ylim(0, 1.05)
        ax.set_title("routing entropy per layer (1 = uniform)")
    ax.set_xticks(list(x), names)
    ax.set_xlabel("MoE layer")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path, force=force, inputs=inputs)


def save_figure(fig, path: str | Path, *, force: bool, inputs=()) -> dict:
    """``--plot``'s PNG through :func:`write_output_file` (atomic, never an input, ``--force`` to
    replace), the figure closed either way; returns ``{"path", "bytes"}``."""
    import matplotlib.pyplot as plt  # lazy: optional dependency

    try:
        written = write_output_file(path, lambda p: fig.savefig(p, dpi=110, format="png"), force=force, inputs=inputs,
                                    option="--plot")
    finally:
        plt.close(fig)
    return {"path": str(path), "bytes": written.stat().st_size}


def _label(ax, bars, fmt: str) -> None:
    """Each bar's value above it, and head room for the labels."""
    for b in bars:
        ax.bar_label(b, fmt=fmt, fontsize=7, padding=1)
    ax.margins(y=0.15)
