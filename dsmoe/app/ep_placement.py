"""Where each routed expert lives under expert parallelism (EP): per MoE layer, the experts of each rank.

- :func:`contiguous_placement` — the default: experts ``0..E/N-1`` on rank 0, … (the split of
  :func:`dsmoe.app.placement.contiguous`).
- :func:`read_placement` — ``dsmoe experts --place N --json``'s document (or its ``placement``
  object): one assignment per MoE layer, from measured traffic.
- :func:`add_redundant` — EPLB-style replicas: ``R`` extra copies per layer of the hottest experts
  (by measured load per replica), each on the least loaded rank that lacks it; a token's slot for a
  replicated expert goes to one replica, chosen round-robin by token (so replicas split the tokens).

A placement must cover every expert of every MoE layer; an expert on two ranks is refused unless
it is a replica added by ``--redundant-experts``. Light module: no torch at import.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dsmoe.app.placement import contiguous
from dsmoe.errors import DsmoeError


@dataclass(frozen=True)
class Placement:
    """``layers[l][r]``: the global ids of the experts rank ``r`` holds in MoE layer ``l`` (its local
    experts, in this order). ``loads[l][e]``: measured routing slots per expert (when known)."""

    world: int
    experts: int
    layers: dict[int, list[list[int]]]
    source: str = "contiguous"
    redundant: int = 0
    loads: dict[int, list[int]] = field(default_factory=dict)

    def local(self, layer: int, rank: int) -> list[int]:
        return self.layers[layer][rank]

    def replicas(self, layer: int) -> list[list[tuple[int, int]]]:
        """Per expert: its ``(rank, local index)`` copies, in rank order."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.experts)]
        for r, experts in enumerate(self.layers[layer]):
            for j, e in enumerate(experts):
                out[e].append((r, j))
        return out

    def to_json(self) -> dict:
        return {"world": self.world, "experts": self.experts, "source": self.source, "redundant": self.redundant,
                "layers": [{"layer": layer, "assignment": a} for layer, a in sorted(self.layers.items())]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json()["layers"], sort_keys=True).encode()).hexdigest()[:16]

    def busiest_share(self) -> float | None:
        """The busiest rank's share of all routing slots, summed over layers (replicas split their
        expert's load evenly); None without measured loads. 1/N is perfect balance."""
        if not self.loads:
            return None
        per_rank = [0.0] * self.world
        total = 0.0
        for layer, assign in self.layers.items():
            loads = self.loads.get(layer)
            if loads is None:
                continue
            copies = [0] * self.experts
            for experts in assign:
                for e in experts:
                    copies[e] += 1
            for r, experts in enumerate(assign):
                per_rank[r] += sum(loads[e] / copies[e] for e in experts)
            total += sum(loads)
        return max(per_rank) / total if total else None


def contiguous_placement(moe_layers: list[int], experts: int, world: int) -> Placement:
    _check_world(experts, world)
    return Placement(world, experts, {layer: contiguous(experts, world) for layer in moe_layers})


def read_placement(path: str | Path, moe_layers: list[int], experts: int, world: int) -> Placement:
    """A placement from ``dsmoe experts --place N --json`` (the whole document or its ``placement``)."""
    _check_world(experts, world)
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DsmoeError(f"cannot read placement {p}: {e}") from None
    counts = {s["layer"]: s["counts"] for s in doc.get("layers", []) if isinstance(s, dict) and "counts" in s} \
        if isinstance(doc, dict) else {}
    plan = doc.get("placement", doc) if isinstance(doc, dict) else None
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list):
        raise DsmoeError(f"{p} is not a placement: expected `dsmoe experts --place N --json` output "
                         "(a \"placement\" object with \"layers\": [{\"layer\", \"assignment\"}])")
    layers: dict[int, list[list[int]]] = {}
    for item in plan["layers"]:
        if not isinstance(item, dict) or not isinstance(item.get("layer"), int) or not isinstance(item.get("assignment"), list):
            raise DsmoeError(f"{p}: every placement layer needs an integer \"layer\" and an \"assignment\" list")
        layers[item["layer"]] = item["assignment"]
    if sorted(layers) != sorted(moe_layers):
        raise DsmoeError(f"{p} places experts for layers {sorted(layers)}; the model's MoE layers are {sorted(moe_layers)}")
    for layer, assign in layers.items():
        check_assignment(assign, experts, world, where=f"{p} layer {layer}", redundant=False)
    return Placement(world, experts, layers, source=str(p), loads={k: v for k, v in counts.items() if k in layers})


def check_assignment(assign, experts: int, world: int, *, where: str, redundant: bool) -> None:
    """Every expert on at least one rank, every rank at least one expert, ids in range, and no expert
    twice unless ``redundant`` (then never twice on one rank)."""
    if not isinstance(assign, list) or len(assign) != world:
        n = len(assign) if isinstance(assign, list) else "no"
        raise DsmoeError(f"{where}: the placement is for {n} ranks, not {world} (--ep {world})")
    seen: dict[int, int] = {}
    for r, ids in enumerate(assign):
        if not isinstance(ids, list) or not ids or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise DsmoeError(f"{where}: rank {r} needs a non-empty list of expert ids")
        for e in ids:
            if not 0 <= e < experts:
                raise DsmoeError(f"{where}: expert {e} on rank {r} is outside [0, {experts})")
            if e in seen and (not redundant or seen[e] == r):
                raise DsmoeError(f"{where}: expert {e} is placed twice (ranks {seen[e]} and {r}); "
                                 "replicas need --redundant-experts")
            seen[e] = r
    missing = sorted(set(range(experts)) - set(seen))
    if missing:
        raise DsmoeError(f"{where}: expert {missing[0]} is on no rank" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))


def add_redundant(p: Placement, r_extra: int) -> Placement:
    """``r_extra`` more replicas per layer, EPLB's way: first choose the copies (repeatedly give one
    more replica to the expert with the highest load per replica), then pack all replicas afresh,
    heaviest first, each onto the least loaded rank that has room (``ceil((E+R)/N)`` slots) and does
    not hold that expert yet; a rank's load counts each replica as ``load / copies``."""
    if r_extra < 0:
        raise DsmoeError(f"--redundant-experts must be >= 0, got {r_extra}")
    if r_extra == 0:
        return p
    if not p.loads:
        raise DsmoeError("--redundant-experts picks the hot experts from measured loads: give --placement FILE "
                         "from `dsmoe experts --place N --json`")
    if r_extra > p.experts * (p.world - 1):
        raise DsmoeError(f"--redundant-experts {r_extra}: at most {p.experts * (p.world - 1)} replicas fit {p.world} ranks")
    room = -(-(p.experts + r_extra) // p.world)
    layers = {}
    for layer in p.layers:
        loads = p.loads[layer]
        copies = [1] * p.experts
        for _ in range(r_extra):
            e = max((e for e in range(p.experts) if copies[e] < p.world), key=lambda e: (loads[e] / copies[e], -e))
            copies[e] += 1
        items = sorted(((loads[e] / copies[e], e) for e in range(p.experts) for _ in range(copies[e])),
                       key=lambda t: (-t[0], t[1]))
        assign: list[list[int]] = [[] for _ in range(p.world)]
        total = [0.0] * p.world
        for w, e in items:
            r = min((r for r in range(p.world) if len(assign[r]) < room and e not in assign[r]),
                    key=lambda r: (total[r], len(assign[r]), r))
            assign[r].append(e)
            total[r] += w
        check_assignment(assign, p.experts, p.world, where=f"layer {layer}", redundant=True)
        layers[layer] = [sorted(a) for a in assign]
    return Placement(p.world, p.experts, layers, source=p.source, redundant=r_extra, loads=p.loads)


def _check_world(experts: int, world: int) -> None:
    if not 1 <= world <= experts:
        raise DsmoeError(f"--ep needs 1 <= N <= {experts} (the number of routed experts), got {world}")
