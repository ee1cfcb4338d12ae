"""Expert-load diagnostics end to end on the eager model and the fused graph: a router forced to
known experts gives exactly known counts, the fused graph's exposed router equals the eager
router token for token for every routing variant, drift is what an independent router says."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import ROUTING_VARIANTS, reference_route, tiny

import dsmoe
from dsmoe.app.expert_stats import RouterTrace, compare_report
from dsmoe.app.experts import report_of, trace_prompts
from dsmoe.app.router_trace import eager_router_step, fused_router_step, tap
from dsmoe.ir import capture, sample_inputs
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import pass_names, run_pipeline
from dsmoe.router_hooks import RouterHooks

PROMPTS = [[1, 5, 9, 17, 33, 2], [7, 7, 7], list(range(40, 60))]
T = sum(map(len, PROMPTS))


@functools.cache
def _model(variant):
    return tiny(variant)


@functools.cache
def _fused(variant):
    return fused_router_step(_model(variant))


# two variants in the developers' loop (softmax greedy; sigmoid + bias + groups), all in `make test`
SWEEP = [v if v in ("v1-softmax-greedy", "v3-noaux-tc") else pytest.param(v, marks=pytest.mark.slow)
         for v in ROUTING_VARIANTS]


def forced(biased: dict[int, list[int]]):
    """V3 routing, ungrouped, gate weights 0 (every score sigmoid(0) = 0.5): the correction bias
    alone chooses, so every token of layer l goes to ``biased[l]``."""
    model = tiny("v3-noaux-tc-ungrouped")
    with torch.no_grad():
        for layer, experts in biased.items():
            gate = model.model.layers[layer].mlp.gate
            gate.weight.zero_()
            gate.e_score_correction_bias.zero_()
            for rank, e in enumerate(experts):
                gate.e_score_correction_bias[e] = 0.3 - 0.1 * rank
    return model


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_a_forced_router_gives_exactly_known_counts(backend):
    want = {1: [3, 5], 2: [0, 7]}
    model = forced(want)
    step = eager_router_step(model) if backend == "eager" else fused_router_step(model)
    report = report_of(trace_prompts(step, model.config, PROMPTS, torch.float32), model.config)
    spec = model.config.routing
    w = 0.5 / (0.5 + 0.5 + 1e-20) if spec.norm_topk_prob else 0.5
    w = w * spec.scaling if spec.scaled else w
    assert report["tokens"] == T and [s["layer"] for s in report["layers"]] == [1, 2]
    for s in report["layers"]:
        experts = want[s["layer"]]
        assert s["counts"] == [T if e in experts else 0 for e in range(8)]
        assert s["never_chosen"] == [e for e in range(8) if e not in experts]
        assert s["max_over_mean"] == pytest.approx(4.0)           # T / (2T / 8)
        assert s["cv"] == pytest.approx(3 ** 0.5)                 # two experts at T, six at 0, mean T/4
        assert s["entropy"] == pytest.approx(1 / 3)               # ln 2 / ln 8
        assert s["top_pairs"] == [{"experts": sorted(experts), "tokens": T, "fraction": 1.0}]
        assert [s["mean_weight"][e] for e in experts] == pytest.approx([w, w])
        assert 0.0 < s["shared_share"] < 1.0


@pytest.mark.parametrize("variant", SWEEP)
def test_fused_router_outputs_equal_the_eager_router(variant):
    model, fused = _model(variant), _fused(variant)
    for args in (sample_inputs(model.config, batch=2, seq=6, past=0, seed=1),
                 sample_inputs(model.config, batch=3, seq=1, past=4, seed=2)):
        with torch.no_grad(), eager_router_step(model) as eager:
            _, _, ref = eager(*args)
            _, _, got = fused(*args)
        assert list(got) == list(ref) == model.config.moe_layers
        for layer in ref:
            a, b = ref[layer], got[layer]
            B, S = args[0].shape
            assert a["ids"].shape == b["ids"].shape == (B * S, model.config.routing.top_k)
            assert b["ids"].dtype == torch.int32 and b["weights"].dtype == torch.float32
            assert torch.equal(a["ids"], b["ids"]), f"layer {layer}"
            torch.testing.assert_close(a["weights"], b["weights"], rtol=1e-5, atol=1e-6)
            for f in ("routed_norm", "shared_norm"):
                torch.testing.assert_close(a[f], b[f], rtol=1e-4, atol=1e-5)


def test_expose_router_is_optional_last_idempotent_and_keeps_logits():
    model, gm = _model("v1-softmax-greedy"), _fused("v1-softmax-greedy")
    assert "expose_router" not in pass_names() and pass_names(PassContext(router_stats=True))[-1] == "expose_router"
    assert gm.meta["dsmoe_router"] == {1: ["ids", "weights", "routed_norm", "shared_norm"],
                                       2: ["ids", "weights", "routed_norm", "shared_norm"]}
    assert run_pipeline(gm, PassContext(router_stats=True))[1][-1].rewrites == 0
    args = sample_inputs(model.config, batch=2, seq=3, past=2)
    with torch.no_grad():
        out, ref = gm(*args), model(*args[:3], args[3], use_cache=True)
    assert len(out) == 3
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(out[1], ref[1]))


def test_folded_shared_experts_expose_ids_and_weights_only():
    model = _model("v1-softmax-greedy")
    gm, _ = run_pipeline(capture(model), PassContext(fold_shared_experts=True, router_stats=True))
    assert gm.meta["dsmoe_router"] == {1: ["ids", "weights"], 2: ["ids", "weights"]}
    with torch.no_grad(), eager_router_step(model) as eager:
        ref = eager(*sample_inputs(model.config, batch=1, seq=4, past=0))[2]
        got = gm(*sample_inputs(model.config, batch=1, seq=4, past=0))[2]
    assert all(torch.equal(ref[i]["ids"], got[i]["ids"]) for i in ref)


def test_shared_share_is_zero_when_the_shared_experts_output_nothing():
    model = copy.deepcopy(_model("v1-softmax-greedy"))
    with torch.no_grad():
        model.model.layers[1].mlp.shared_experts.down_proj.weight.zero_()
    with eager_router_step(model) as eager:  # the fused graph's norms equal these (the sweep above)
        shares = [s["shared_share"] for s in report_of(trace_prompts(eager, model.config, PROMPTS, torch.float32),
                                                       model.config)["layers"]]
    assert shares[0] == 0.0 and 0.0 < shares[1] < 1.0


def test_compare_with_itself_is_zero_drift_and_a_perturbed_router_drifts_as_computed():
    a = _model("v1-softmax-greedy")
    b = copy.deepcopy(a)
    with torch.no_grad():  # perturb only the last MoE layer: its input is then the same in both models
        gate = b.model.layers[2].mlp.gate
        gate.weight.add_(torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    def trace(model):
        with eager_router_step(model) as step:
            return trace_prompts(step, model.config, PROMPTS, torch.float32)

    trace_a = trace(a)
    same = compare_report(trace_a, trace(a), num_experts=8)
    assert [(s["changed"], s["overlap"], s["top1_changed"]) for s in same["layers"]] == [(0.0, 1.0, 0.0)] * 2

    inputs = []  # the independent computation: layer 2's gate inputs, routed by reference_route with both weights
    handle = a.model.layers[2].mlp.gate.register_forward_pre_hook(lambda m, args: inputs.append(args[0].double()))
    trace_a = trace(a)
    handle.remove()
    x = torch.cat(inputs)
    spec = a.config.routing.as_kwargs()
    sets = [[{e for e, _ in reference_route((xt @ w.double().T).tolist(), None, spec)} for xt in x]
            for w in (a.model.layers[2].mlp.gate.weight, b.model.layers[2].mlp.gate.weight)]
    changed = sum(s != t for s, t in zip(*sets)) / T
    overlap = sum(len(s & t) / 2 for s, t in zip(*sets)) / T
    assert 0.0 < changed < 1.0
    drift = compare_report(trace_a, trace(b), num_experts=8)
    assert drift["layers"][0]["changed"] == 0.0                   # layer 1 is untouched
    assert drift["layers"][1]["changed"] == pytest.approx(changed) and drift["layers"][1]["overlap"] == pytest.approx(overlap)


def test_tap_drops_padded_tokens_and_hooks_come_off():
    model = _model("v1-softmax-greedy")
    trace = RouterTrace()
    ids, mask, pos, past = sample_inputs(model.config, batch=2, seq=4, past=0)
    mask[1, :2] = 0  # two padded positions in the second row
    with RouterHooks(model) as hooks:
        tap(lambda *a: (*model(*a, use_cache=True), hooks.pop()), trace)(ids, mask, pos, past)
    assert trace.tokens(1) == 6 and not any(m._forward_hooks for m in model.modules())


def test_a_model_without_moe_layers_has_no_router():
    model = dsmoe.load("preset:tiny", overrides={"first_k_dense_replace": 3})
    assert RouterHooks(model).layers == []
    gm, reports = run_pipeline(capture(model), PassContext(router_stats=True))
    assert reports[-1].rewrites == 0 and "dsmoe_router" not in gm.meta
