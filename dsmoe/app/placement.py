"""Expert placement for expert parallelism: each layer's E routed experts onto N devices.

Every device holds the same number of experts (E/N; when N does not divide E, the first E mod N
devices hold one more), as expert parallelism needs for memory. A device's *load* is the number
of routing slots (token, k) its experts received in the measured run; a layer is as slow as its
most loaded device, so the objective is the per-layer maximum.

Method (stated, heuristic): **greedy LPT** — experts by decreasing load, each onto the least
loaded device that still has room — then **pairwise-swap local search**: while swapping one
expert of the most loaded device with one expert of another device lowers both below the current
maximum, make the best such swap. Each swap lowers the sorted vector of device loads
lexicographically, so the search ends. The search also runs from the contiguous split, and the
better of the two results is proposed (so it is never worse than the naive split). The result is compared with the naive *contiguous* split
(experts 0..E/N-1 on device 0, …) and with a lower bound (:func:`lower_bound`): the mean, or the
heaviest expert plus the lightest ones that must share its device, whichever is larger.
"""

from __future__ import annotations

import torch

from dsmoe.errors import DsmoeError

METHOD = ("greedy LPT (heaviest expert first onto the least-loaded device with room) "
          "+ pairwise-swap local search on the most loaded device (also from the contiguous split; the better one)")


def capacities(num_experts: int, devices: int) -> list[int]:
    """Experts per device: E // N each, one more on the first E mod N devices."""
    return [num_experts // devices + (1 if d < num_experts % devices else 0) for d in range(devices)]


def contiguous(num_experts: int, devices: int) -> list[list[int]]:
    """The naive split: consecutive experts per device."""
    out, start = [], 0
    for c in capacities(num_experts, devices):
        out.append(list(range(start, start + c)))
        start += c
    return out


def device_loads(assignment: list[list[int]], loads: list[int]) -> list[int]:
    return [sum(loads[e] for e in experts) for experts in assignment]


def lpt(loads: list[int], devices: int) -> list[list[int]]:
    """Greedy longest-processing-time-first under the per-device capacities."""
    caps = capacities(len(loads), devices)
    assignment: list[list[int]] = [[] for _ in range(devices)]
    total = [0] * devices
    for e in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
        d = min((d for d in range(devices) if len(assignment[d]) < caps[d]), key=lambda d: (total[d], d))
        assignment[d].append(e)
        total[d] += loads[e]
    return assignment


def refine(assignment: list[list[int]], loads: list[int], max_swaps: int | None = None) -> list[list[int]]:
    """Pairwise-swap local search on the most loaded device (see the module docstring)."""
    assignment = [list(a) for a in assignment]
    load_E = torch.tensor(loads, dtype=torch.float64)
    for _ in range(max_swaps if max_swaps is not None else 100 * len(loads)):
        L = torch.tensor(device_loads(assignment, loads), dtype=torch.float64)
        d = int(L.argmax())
        others = [(o, e) for o, experts in enumerate(assignment) if o != d for e in experts]
        if not others or not assignment[d]:
            break
        A = load_E[assignment[d]]                               # [a] loads on the max device
        B = load_E[[e for _, e in others]]                       # [b] loads elsewhere
        Lo = L[[o for o, _ in others]]
        delta = A[:, None] - B[None, :]                          # what moves from d to o
        worst = torch.maximum(L[d] - delta, Lo[None, :] + delta)
        worst = torch.where((delta > 0) & (worst < L[d]), worst, torch.inf)
        best = int(worst.argmin())
        if not torch.isfinite(worst.flatten()[best]):
            break
        i, j = divmod(best, len(others))
        o, b = others[j]
        a = assignment[d][i]
        assignment[d][i] = b
        assignment[o][assignment[o].index(b)] = a
    return [sorted(a) for a in assignment]


def place(loads: list[int], devices: int) -> dict:
    """One layer: the proposed assignment, its per-device loads and imbalance, and the contiguous split's."""
    E = len(loads)
    if not 1 <= devices <= E:
        raise DsmoeError(f"--place needs 1 <= N <= {E} (the number of routed experts), got {devices}")
    naive = contiguous(E, devices)
    # the search from LPT, and from the contiguous split (so the proposal is never worse than it)
    proposed = min((refine(lpt(loads, devices), loads), refine(naive, loads)),
                   key=lambda a: sorted(device_loads(a, loads), reverse=True))
    total = sum(loads)
    mean = total / devices
    prop_l, naive_l = device_loads(proposed, loads), device_loads(naive, loads)
    ratio = (lambda ls: max(ls) / mean) if mean > 0 else (lambda ls: 1.0)
    return {
        "assignment": proposed, "device_load": prop_l, "max_over_mean": ratio(prop_l),
        "contiguous_device_load": naive_l, "contiguous_max_over_mean": ratio(naive_l),
        "lower_bound_max_over_mean": ratio([lower_bound(loads, devices)]),
    }


def lower_bound(loads: list[int], devices: int) -> float:
    """No placement's busiest device carries less than the mean, nor less than the heaviest expert
    plus the lightest experts that must share its device (every device holds at least E // N)."""
    rest = sorted(loads)
    heaviest = rest.pop() if rest else 0
    fill = len(loads) // devices - 1
    return max(sum(loads) / devices, heaviest + sum(rest[:fill]))


def placement_report(report: dict, devices: int) -> dict:
    """Placement for every layer of an expert report, and the per-step totals: a step waits for
    the most loaded device of each layer, so it costs ``Σ_layers max(device load)``."""
    layers = [{"layer": s["layer"], **place(s["counts"], devices)} for s in report["layers"]]
    step = {k: sum(max(s[f]) for s in layers) for k, f in (("proposed", "device_load"),
                                                            ("contiguous", "contiguous_device_load"))}
    step["ideal"] = sum(sum(s["device_load"]) / devices for s in layers)
    return {"devices": devices, "method": METHOD, "capacities": capacities(report["experts"], devices),
            "layers": layers, "step_slots": step,
            "speedup_vs_contiguous": step["contiguous"] / step["proposed"] if step["proposed"] else 1.0}
