"""Expert-load statistics: pure functions of the routers' choices (no model, no I/O).

Inputs per MoE layer are what every backend records (:mod:`dsmoe.router_hooks`, the
``expose_router`` pass, an export's ``router.{layer}.*`` outputs), concatenated over calls:
``ids [T,K]`` (the experts each token chose), ``weights [T,K]`` (their mixing weights) and,
where available, ``routed_norm [T]`` / ``shared_norm [T]``. Shape letters: T tokens, K experts
per token, E routed experts.

Definitions (per layer; a *slot* is one (token, k) choice, so there are T·K slots):

- ``counts[e]``: slots that chose expert e; ``load[e] = counts[e] / (T·K)``.
- ``max_over_mean``: ``max(counts) / mean(counts)`` (1 = perfectly balanced; E/K = every token on
  the same K experts); ``cv``: population standard deviation of ``counts`` over its mean.
- ``entropy``: ``-Σ load·ln(load) / ln E`` (1 = uniform load, 0 = one expert takes all).
- ``never_chosen``: experts with ``counts[e] = 0``; ``mean_weight[e]``: the mean routing weight
  of e's slots (None when never chosen).
- ``top_pairs``: the expert pairs most often chosen together by one token (count, fraction of T).
- ``shared_share``: ``Σ‖shared_t‖ / Σ(‖routed_t‖ + ‖shared_t‖)`` — the share of the MoE output's
  magnitude that comes from the shared experts (None when the norms were not recorded; 0 for a
  model without shared experts).
- drift (:func:`drift`): ``changed`` = fraction of tokens whose expert *set* differs between two
  sources, ``overlap`` = mean ``|A∩B| / K``, ``top1_changed`` = fraction whose highest-weight expert
  differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dsmoe.errors import DsmoeError

Router = dict[int, dict[str, Tensor]]


@dataclass
class RouterTrace:
    """The routers' choices accumulated over calls: per layer, one tensor list per field."""

    parts: dict[int, dict[str, list[Tensor]]] = field(default_factory=dict)
    calls: int = 0

    def add(self, router: Router, valid: Tensor | None = None) -> None:
        """Append one call's router values; ``valid [T] bool`` keeps only real (unpadded) tokens."""
        self.calls += 1
        for layer, fields in router.items():
            dst = self.parts.setdefault(layer, {})
            for name, t in fields.items():
                t = t.detach().cpu()
                dst.setdefault(name, []).append(t if valid is None else t[valid.cpu()])

    @property
    def layers(self) -> list[int]:
        return sorted(self.parts)

    def field(self, layer: int, name: str) -> Tensor | None:
        got = self.parts[layer].get(name)
        return torch.cat(got) if got else None

    def tokens(self, layer: int) -> int:
        ids = self.field(layer, "ids")
        return 0 if ids is None else ids.shape[0]


def layer_stats(ids: Tensor, weights: Tensor, num_experts: int, *, routed_norm: Tensor | None = None,
                shared_norm: Tensor | None = None, has_shared: bool = True, top_pairs: int = 5) -> dict:
    """The statistics of one layer (definitions in the module docstring)."""
    T, K = ids.shape
    E = num_experts
    ids = ids.long()
    if T == 0:
        raise DsmoeError("no tokens were routed")
    if int(ids.min()) < 0 or int(ids.max()) >= E:
        raise DsmoeError(f"expert ids outside [0, {E}): [{int(ids.min())}, {int(ids.max())}]")
    w = weights.double()
    if not torch.isfinite(w).all():
        raise DsmoeError("non-finite routing weights")
    counts = torch.bincount(ids.flatten(), minlength=E)
    wsum = torch.zeros(E, dtype=torch.float64).index_add_(0, ids.flatten(), w.flatten())
    c = counts.double()
    mean = T * K / E
    load = c / (T * K)
    nz = load[load > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(E)) if E > 1 else 1.0
    onehot = torch.zeros(T, E, dtype=torch.float32).scatter_(1, ids, 1.0)  # exact counts below 2^24 tokens
    co = onehot.T @ onehot  # [E,E]: tokens choosing both
    iu = torch.triu_indices(E, E, offset=1)
    pair_counts = co[iu[0], iu[1]]
    order = sorted(range(pair_counts.numel()), key=lambda j: (-float(pair_counts[j]), j))[:top_pairs]
    pairs = [{"experts": [int(iu[0, j]), int(iu[1, j])], "tokens": int(pair_counts[j]),
              "fraction": float(pair_counts[j]) / T} for j in order if pair_counts[j] > 0]
    return {
        "tokens": T,
        "counts": counts.tolist(),
        "load": load.tolist(),
        "max_over_mean": float(c.max()) / mean,
        "cv": float(c.std(unbiased=False)) / mean,
        "entropy": entropy,
        "never_chosen": [e for e in range(E) if counts[e] == 0],
        "mean_weight": [float(wsum[e] / c[e]) if counts[e] else None for e in range(E)],
        "top_pairs": pairs,
        "shared_share": _shared_share(routed_norm, shared_norm, has_shared),
    }


def _shared_share(routed_norm: Tensor | None, shared_norm: Tensor | None, has_shared: bool) -> float | None:
    if routed_norm is None or (has_shared and shared_norm is None):
        return None
    r = float(routed_norm.double().sum())
    s = float(shared_norm.double().sum()) if shared_norm is not None else 0.0
    if not (math.isfinite(r) and math.isfinite(s)):
        raise DsmoeError("non-finite expert output norms")
    return s / (r + s) if r + s > 0 else None


def drift(ids_a: Tensor, ids_b: Tensor, weights_a: Tensor, weights_b: Tensor, num_experts: int) -> dict:
    """How two sources' routing of the same tokens differs (definitions in the module docstring)."""
    if ids_a.shape != ids_b.shape:
        raise DsmoeError(f"the sources routed {tuple(ids_a.shape)} and {tuple(ids_b.shape)} (tokens, experts per token): "
                         f"not the same prompts or not the same top-k")
    T, K = ids_a.shape
    if T == 0:
        raise DsmoeError("no tokens were routed")
    a = torch.zeros(T, num_experts, dtype=torch.bool).scatter_(1, ids_a.long(), True)
    b = torch.zeros(T, num_experts, dtype=torch.bool).scatter_(1, ids_b.long(), True)
    inter = (a & b).sum(dim=-1).double()
    top_a = ids_a.gather(1, weights_a.argmax(dim=-1, keepdim=True))
    top_b = ids_b.gather(1, weights_b.argmax(dim=-1, keepdim=True))
    return {"tokens": T, "changed": float((a != b).any(dim=-1).double().mean()),
            "overlap": float((inter / K).mean()), "top1_changed": float((top_a != top_b).double().mean())}


def expert_report(trace: RouterTrace, *, num_experts: int, top_k: int, has_shared: bool, top_pairs: int = 5) -> dict:
    """``{"experts", "top_k", "tokens", "layers": [{"layer", **layer_stats}], "summary"}`` of a trace."""
    if not trace.layers:
        raise DsmoeError("no router outputs were recorded (the source has no MoE layers)")
    layers = []
    for layer in trace.layers:
        s = layer_stats(trace.field(layer, "ids"), trace.field(layer, "weights"), num_experts,
                        routed_norm=trace.field(layer, "routed_norm"), shared_norm=trace.field(layer, "shared_norm"),
                        has_shared=has_shared, top_pairs=top_pairs)
        layers.append({"layer": layer, **s})
    worst = max(layers, key=lambda s: s["max_over_mean"])
    return {
        "experts": num_experts, "top_k": top_k, "tokens": layers[0]["tokens"], "calls": trace.calls,
        "layers": layers,
        "summary": {"worst_layer": worst["layer"], "worst_max_over_mean": worst["max_over_mean"],
                    "mean_max_over_mean": sum(s["max_over_mean"] for s in layers) / len(layers),
                    "mean_entropy": sum(s["entropy"] for s in layers) / len(layers),
                    "never_chosen": sum(len(s["never_chosen"]) for s in layers)},
    }


def compare_report(a: RouterTrace, b: RouterTrace, *, num_experts: int) -> dict:
    """Per-layer :func:`drift` of two traces of the same prompts (same layers)."""
    if a.layers != b.layers:
        raise DsmoeError(f"the sources have different MoE layers: {a.layers} and {b.layers}")
    layers = [{"layer": layer, **drift(a.field(layer, "ids"), b.field(layer, "ids"), a.field(layer, "weights"),
                                       b.field(layer, "weights"), num_experts)} for layer in a.layers]
    return {"layers": layers, "mean_changed": sum(s["changed"] for s in layers) / len(layers),
            "mean_overlap": sum(s["overlap"] for s in layers) / len(layers)}
