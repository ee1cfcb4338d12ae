"""``dsmoe experts --by-domain NAME=FILE …``: do experts specialize by domain?

Each domain's text is tokenized with the source's ``tokenizer.json`` and cut into prompts of
``--seq-len`` tokens (at most ``--max-prompts`` per domain), routed like any prompt. Per MoE layer:

* ``load[d][e]`` — the share of domain d's expert slots (T_d·K) that go to expert e;
* ``mi_bits`` — the mutual information between the domain and the expert chosen in a slot,
  ``I(D;E) = Σ_d Σ_e p(d)·p(e|d)·log2(p(e|d)/p(e))`` with every domain weighted equally
  (``p(d) = 1/|D|``, so a longer file does not count more) and ``p(e) = Σ_d p(d)·p(e|d)``;
  ``mi_normalized`` divides by ``H(D) = log2 |D|`` (0: every domain routes alike; 1: the domains
  use disjoint experts);
* ``shared_share[d]`` — the share of the MoE output's magnitude that the shared experts carry
  on domain d's tokens (``‖shared‖ / (‖routed‖ + ‖shared‖)``, summed over tokens; the backends
  that record expert output norms);
* ``top[d]`` — the domain's three busiest experts.
"""

from __future__ import annotations

import math
from pathlib import Path

from dsmoe.errors import DsmoeError


def parse_domains(items: tuple[str, ...] | list[str]) -> list[tuple[str, Path]]:
    out, seen = [], set()
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise DsmoeError(f"--by-domain expects NAME=FILE, got {item!r}")
        if name in seen:
            raise DsmoeError(f"--by-domain names domain {name!r} twice")
        if not Path(file).is_file():
            raise DsmoeError(f"--by-domain {name}: {file} does not exist")
        seen.add(name)
        out.append((name, Path(file)))
    if len(out) < 2:
        raise DsmoeError("--by-domain needs at least two domains to compare (NAME=FILE, repeated)")
    return out


def domain_prompts(source: str, domains: list[tuple[str, Path]], *, seq_len: int, max_prompts: int,
                   vocab_size: int) -> dict[str, list[list[int]]]:
    """``{name: prompts}``: each file's tokens cut into prompts of ``seq_len`` (a shorter tail is dropped)."""
    from dsmoe.app.generate import load_tokenizer

    tok_path = Path(source) / "tokenizer.json"
    if not tok_path.is_file():
        raise DsmoeError(f"--by-domain reads text and needs {tok_path}")
    if seq_len < 1 or max_prompts < 1:
        raise DsmoeError(f"--seq-len and --max-prompts must be at least 1, got {seq_len} and {max_prompts}")
    tok = load_tokenizer(tok_path, what="--by-domain")
    out = {}
    for name, path in domains:
        try:
            ids = tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
        except UnicodeDecodeError:
            raise DsmoeError(f"--by-domain {name}: {path} is not UTF-8 text") from None
        prompts = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:max_prompts]
        if not prompts:
            raise DsmoeError(f"--by-domain {name}: {path} has {len(ids)} tokens, fewer than one prompt of --seq-len {seq_len}")
        if max(max(p) for p in prompts) >= vocab_size:
            raise DsmoeError(f"--by-domain {name}: token ids beyond the model's vocabulary of {vocab_size}")
        out[name] = prompts
    return out


def domain_report(traces: dict, *, num_experts: int, top_k: int, has_shared: bool) -> dict:
    """The per-layer domain statistics of one :class:`RouterTrace` per domain (module docstring)."""
    import torch

    from dsmoe.app.expert_stats import _shared_share

    names = list(traces)
    layers = traces[names[0]].layers
    out = []
    for layer in layers:
        load = {}
        for d in names:
            ids = traces[d].field(layer, "ids").long()
            load[d] = (torch.bincount(ids.flatten(), minlength=num_experts).double() / ids.numel()).tolist()
        p_e = [sum(load[d][e] for d in names) / len(names) for e in range(num_experts)]
        mi = sum(load[d][e] / len(names) * math.log2(load[d][e] / p_e[e])
                 for d in names for e in range(num_experts) if load[d][e] > 0)
        share = {d: _shared_share(traces[d].field(layer, "routed_norm"), traces[d].field(layer, "shared_norm"), has_shared)
                 for d in names}
        top = {d: sorted(range(num_experts), key=lambda e, d=d: (-load[d][e], e))[:3] for d in names}
        out.append({"layer": layer, "load": load, "mi_bits": mi, "mi_normalized": mi / math.log2(len(names)),
                    "shared_share": share, "top": top})
    return {"domains": names, "tokens": {d: traces[d].tokens(layers[0]) for d in names}, "layers": out,
            "mean_mi_normalized": sum(s["mi_normalized"] for s in out) / len(out)}


def render_domains(rep: dict, console) -> None:
    from rich import box
    from rich.table import Table

    names = rep["domains"]
    t = Table(title="experts by domain: " + ", ".join(f"{d} {rep['tokens'][d]} tokens" for d in names),
              caption="MI: mutual information of domain and chosen expert (MI / H(D): 0 = all domains route alike, "
                      "1 = disjoint experts); busiest: share of the domain's slots; shared: share of the MoE output "
                      "magnitude carried by the shared experts", box=box.SIMPLE_HEAD)
    for col in ("layer", "MI bits", "MI / H(D)", "domain", "busiest experts", "shared"):
        t.add_column(col, justify="left" if col in ("domain", "busiest experts") else "right")
    for s in rep["layers"]:
        for i, d in enumerate(names):
            top = " ".join(f"{e}:{100 * s['load'][d][e]:.0f}%" for e in s["top"][d])
            share = "-" if s["shared_share"][d] is None else f"{100 * s['shared_share'][d]:.0f}%"
            first = i == 0
            t.add_row(str(s["layer"]) if first else "", f"{s['mi_bits']:.3f}" if first else "",
                      f"{s['mi_normalized']:.3f}" if first else "", d, top, share, end_section=i == len(names) - 1)
    console.print(t)


def plot_domains(doc: dict, path: str | Path, *, force: bool = False, inputs=()) -> dict:
    """One heatmap per MoE layer: domains × experts, each domain's load relative to a uniform share
    (written by :func:`dsmoe.outputs.write_output_file`: refused if it exists unless ``force``)."""
    import matplotlib  # lazy: optional dependency (only --plot draws)

    from dsmoe.app.experts_plot import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency
    from matplotlib.colors import TwoSlopeNorm  # lazy: optional dependency

    rep, E = doc["by_domain"], doc["experts"]
    names, layers = rep["domains"], rep["layers"]
    rel = [[[v * E for v in s["load"][d]] for d in names] for s in layers]
    top = max(2.0, max(max(max(r) for r in m) for m in rel))
    fig, axes = plt.subplots(len(layers), 1, figsize=(12, 1.2 + 0.45 * len(names) * len(layers) + 0.6 * len(layers)),
                             layout="constrained", squeeze=False)
    for ax, s, m in zip(axes[:, 0], layers, rel):
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top),
                       interpolation="nearest")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"layer {s['layer']}: MI(domain; expert) = {s['mi_bits']:.3f} bits ({s['mi_normalized']:.2f} of H(D))",
                     fontsize=9)
    axes[-1, 0].set_xlabel(f"routed expert (0…{E - 1})")
    fig.suptitle(f"expert load by domain relative to a uniform share (1 = uniform) — {doc['source']}, {doc['backend']}")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / uniform share", fraction=0.03)
    return save_figure(fig, path, force=force, inputs=inputs)
