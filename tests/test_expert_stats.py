"""Expert-load statistics and placement: hand-computed cases (pure functions, no model)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmoe.app.expert_stats import RouterTrace, compare_report, drift, expert_report, layer_stats
from dsmoe.app.placement import capacities, contiguous, device_loads, lower_bound, lpt, place, placement_report
from dsmoe.errors import DsmoeError

# 4 tokens, top-2 of 4 experts, written out by hand
IDS = torch.tensor([[0, 1], [1, 0], [0, 2], [1, 2]], dtype=torch.int32)
W = torch.tensor([[0.6, 0.4], [0.55, 0.45], [0.9, 0.1], [0.3, 0.7]])  # top-1 per token: 0, 1, 0, 2


def test_layer_stats_by_hand():
    s = layer_stats(IDS, W, 4, routed_norm=torch.tensor([3.0, 1.0, 1.0, 1.0]), shared_norm=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert s["tokens"] == 4
    assert s["counts"] == [3, 3, 2, 0]                       # expert 0: tokens 0,1,2; 1: 0,1,3; 2: 2,3
    assert s["load"] == [3 / 8, 3 / 8, 2 / 8, 0.0]
    assert s["max_over_mean"] == pytest.approx(3 / 2)        # mean = 8 slots / 4 experts
    std = math.sqrt(((3 - 2) ** 2 * 2 + 0 + 2 ** 2) / 4)
    assert s["cv"] == pytest.approx(std / 2)
    h = -(2 * (3 / 8) * math.log(3 / 8) + (2 / 8) * math.log(2 / 8))
    assert s["entropy"] == pytest.approx(h / math.log(4))
    assert s["never_chosen"] == [3]
    # expert 0 has 0.6, 0.45 and 0.9; expert 1 0.4, 0.55 and 0.3; expert 2 0.1 and 0.7
    assert s["mean_weight"][:3] == pytest.approx([(0.6 + 0.45 + 0.9) / 3, (0.4 + 0.55 + 0.3) / 3, (0.1 + 0.7) / 2])
    assert s["mean_weight"][3] is None
    assert s["top_pairs"] == [{"experts": [0, 1], "tokens": 2, "fraction": 0.5},
                              {"experts": [0, 2], "tokens": 1, "fraction": 0.25},
                              {"experts": [1, 2], "tokens": 1, "fraction": 0.25}]
    assert s["shared_share"] == pytest.approx(4 / (6 + 4))


def test_shared_share_without_norms_or_shared_experts():
    assert layer_stats(IDS, W, 4)["shared_share"] is None
    assert layer_stats(IDS, W, 4, routed_norm=torch.ones(4), has_shared=False)["shared_share"] == 0.0


def test_balanced_and_collapsed_extremes():
    balanced = layer_stats(torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2), 4)
    assert (balanced["max_over_mean"], balanced["cv"], balanced["entropy"]) == (1.0, 0.0, pytest.approx(1.0))
    collapsed = layer_stats(torch.tensor([[0, 1]] * 5), torch.ones(5, 2), 8)
    assert collapsed["max_over_mean"] == 8 / 2 and collapsed["never_chosen"] == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("bad,msg", [(torch.tensor([[0, 4]]), "outside"), (torch.tensor([[-1, 0]]), "outside")])
def test_bad_ids_are_an_error(bad, msg):
    with pytest.raises(DsmoeError, match=msg):
        layer_stats(bad, torch.ones(1, 2), 4)


def test_non_finite_weights_are_an_error():
    with pytest.raises(DsmoeError, match="non-finite"):
        layer_stats(IDS, W.masked_fill(W > 0.8, float("nan")), 4)


def test_drift_by_hand():
    other = torch.tensor([[1, 0], [1, 3], [2, 3], [1, 2]])  # token 0 same set (reordered), 1: one of two, 2: one
    w2 = torch.tensor([[0.7, 0.3], [0.5, 0.4], [0.6, 0.4], [0.8, 0.2]])
    d = drift(IDS, other, W, w2, 4)
    assert d["changed"] == 0.5                               # tokens 1 and 2
    assert d["overlap"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    assert d["top1_changed"] == 0.75                         # top-1 0, 1, 0, 2 vs 1, 1, 2, 1
    assert drift(IDS, IDS, W, W, 4) == {"tokens": 4, "changed": 0.0, "overlap": 1.0, "top1_changed": 0.0}
    with pytest.raises(DsmoeError, match="not the same prompts"):
        drift(IDS, IDS[:3], W, W[:3], 4)


def test_same_sets_can_still_change_the_top_expert():
    d = drift(IDS, torch.tensor([[1, 0], [1, 0], [0, 2], [1, 2]]), W, torch.tensor([[0.6, 0.4]] * 4), 4)
    assert d["changed"] == 0.0 and d["overlap"] == 1.0
    assert d["top1_changed"] == 0.5                          # top-1 0, 1, 0, 2 vs 1, 1, 0, 1


def test_trace_accumulates_calls_and_drops_padding():
    t = RouterTrace()
    t.add({1: {"ids": IDS[:2], "weights": W[:2]}})
    t.add({1: {"ids": IDS[2:], "weights": W[2:]}}, valid=torch.tensor([True, False]))
    assert t.calls == 2 and t.layers == [1] and t.field(1, "ids").tolist() == IDS[:3].tolist()
    r = expert_report(t, num_experts=4, top_k=2, has_shared=True)
    assert r["tokens"] == 3 and r["layers"][0]["counts"] == [3, 2, 1, 0]
    assert compare_report(t, t, num_experts=4)["mean_changed"] == 0.0
    with pytest.raises(DsmoeError, match="no router outputs"):
        expert_report(RouterTrace(), num_experts=4, top_k=2, has_shared=True)


# ---- placement ---------------------------------------------------------------------------

def _optimum(loads: list[int], devices: int) -> int:
    """Brute force: the smallest busiest-device load over every assignment with the capacities."""
    caps = capacities(len(loads), devices)
    best = None
    for labels in itertools.product(range(devices), repeat=len(loads)):
        if any(labels.count(d) != caps[d] for d in range(devices)):
            continue
        m = max(sum(x for x, lab in zip(loads, labels) if lab == d) for d in range(devices))
        best = m if best is None else min(best, m)
    return best


def test_capacities_and_contiguous_split():
    assert capacities(8, 3) == [3, 3, 2] and contiguous(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_placement_hand_case_reaches_the_optimum():
    loads = [8, 7, 6, 5, 4, 3, 2, 1]                         # 36 slots: 18 + 18 is possible, contiguous is 26 / 10
    p = place(loads, 2)
    assert p["contiguous_device_load"] == [26, 10] and p["contiguous_max_over_mean"] == 26 / 18
    assert p["device_load"] == [18, 18] and p["max_over_mean"] == 1.0 and p["lower_bound_max_over_mean"] == 1.0
    assert sorted(e for d in p["assignment"] for e in d) == list(range(8)) and all(len(d) == 4 for d in p["assignment"])


def test_lower_bound_counts_the_heaviest_experts_companions():
    assert lower_bound([58, 36, 35, 31, 18, 17, 16, 45], 4) == 58 + 16   # two experts per device


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=4, max_size=8), st.integers(2, 3))
def test_placement_invariants_against_brute_force(loads, devices):
    p = place(loads, devices)
    flat = sorted(e for d in p["assignment"] for e in d)
    assert flat == list(range(len(loads)))
    assert [len(d) for d in p["assignment"]] == capacities(len(loads), devices)
    assert p["device_load"] == device_loads(p["assignment"], loads)
    best = _optimum(loads, devices)
    assert lower_bound(loads, devices) <= best <= max(p["device_load"]) <= max(p["contiguous_device_load"])
    assert max(p["device_load"]) <= max(device_loads(lpt(loads, devices), loads))


def test_placement_report_totals_and_bad_device_count():
    report = {"experts": 4, "layers": [{"layer": 1, "counts": [4, 3, 2, 1]}, {"layer": 2, "counts": [1, 1, 1, 5]}]}
    r = placement_report(report, 2)
    assert r["step_slots"] == {"proposed": 5 + 6, "contiguous": 7 + 6, "ideal": 5 + 4}
    assert r["speedup_vs_contiguous"] == pytest.approx(13 / 11)
    for n in (0, 5):
        with pytest.raises(DsmoeError, match="--place"):
            place([1, 2, 3, 4], n)
