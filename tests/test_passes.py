"""Passes: exact rewrite counts, negative cases, idempotence, numerics for every routing variant."""

import dataclasses
import functools

import pytest
import torch
from conftest import ROUTING_VARIANTS, tiny

import dsmoe
from dsmoe.app.generate import eager_step, fused_step, greedy_generate
from dsmoe.dtypes import VERIFY_RTOL
from dsmoe.ir import capture, op_histogram, param_bytes, sample_inputs
from dsmoe.passes import pipeline
from dsmoe.passes.context import PassContext
from dsmoe.passes.fuse_gated_mlp import fuse_gated_mlp
from dsmoe.passes.fuse_router import fuse_router
from dsmoe.passes.outline_moe import outline_moe
from dsmoe.passes.pipeline import VerificationError, pass_names, run_pipeline

aten = torch.ops.aten


@functools.cache
def _model(variant):
    return tiny(variant)


def _fresh(variant="v1-softmax-greedy"):
    return capture(_model(variant))


@functools.cache
def _captured(variant):
    """A capture to read, not to rewrite (shared between the tests that only look)."""
    return capture(_model(variant))


def _max_rel(gm, model):
    worst = 0.0
    for args in (sample_inputs(model.config, batch=2, seq=7, past=0, seed=4),
                 sample_inputs(model.config, batch=3, seq=1, past=5, seed=5)):
        with torch.no_grad():
            ref = model(*args[:3], args[3], use_cache=True)[0]
            out = gm(*args)[0]
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
    return worst


def _expert_linears(gm):
    return [n for n in gm.graph.nodes if n.target == aten.linear.default and ".experts." in str(n.args[1].target)]


def test_pass_order_is_pinned():
    assert [n for n, _ in pipeline.PASSES] == ["fuse_router", "outline_moe", "fuse_gated_mlp", "absorb_mla",
                                               "fold_shared_experts", "expose_router"]
    mha, mla = _model("v1-softmax-greedy").config, dsmoe.load_config("preset:mla-tiny")
    assert pass_names(config=mha) == ["fuse_router", "outline_moe", "fuse_gated_mlp"]
    assert pass_names(config=mla) == ["fuse_router", "outline_moe", "fuse_gated_mlp", "absorb_mla"]
    assert pass_names(PassContext(absorb_mla=False), config=mla) == pass_names(config=mha)
    assert pass_names(PassContext(fold_shared_experts=True))[-1] == "fold_shared_experts"
    assert pass_names(PassContext(fold_shared_experts=True, router_stats=True))[-2:] == ["fold_shared_experts",
                                                                                         "expose_router"]


@pytest.mark.parametrize("variant", list(ROUTING_VARIANTS))
def test_pipeline_counts_numerics_and_idempotence(variant):
    model = _model(variant)
    gm, reports = run_pipeline(_fresh(variant), PassContext(verify=True))
    assert [(r.name, r.rewrites) for r in reports] == [("fuse_router", 2), ("outline_moe", 2), ("fuse_gated_mlp", 3)]
    ops = op_histogram(gm)
    # one route and one moe per MoE layer; one gated_mlp per shared-expert block and dense layer
    assert (ops["dsmoe::route"], ops["dsmoe::moe"], ops["dsmoe::gated_mlp"]) == (2, 2, 3)
    assert "aten.topk" not in ops and "aten.index_add_" not in ops and "aten.silu" not in ops
    assert _expert_linears(gm) == []
    assert not any(".experts.0." in name for name, _ in gm.named_parameters())
    assert _max_rel(gm, model) <= 1e-4
    _, again = run_pipeline(gm, PassContext())
    assert [r.rewrites for r in again] == [0, 0, 0]


@pytest.mark.parametrize("variant", ["v1-softmax-greedy", "v3-noaux-tc"])
def test_fold_shared_experts(variant):
    model = _model(variant)
    gm, reports = run_pipeline(_fresh(variant), PassContext(verify=True, fold_shared_experts=True))
    assert reports[-1].name == "fold_shared_experts" and reports[-1].rewrites == 2
    ops = op_histogram(gm)
    assert (ops["dsmoe::moe"], ops.get("dsmoe::gated_mlp"), ops["dsmoe::route"]) == (2, 1, 2)  # dense layer stays
    E, ns, I, H = 8, 2, model.config.moe_intermediate_size, model.config.hidden_size
    w13 = dict(gm.named_parameters())["lm.model.layers.1.mlp.experts.w13_with_shared"]
    assert w13.shape == (E + ns, 2 * I, H)
    assert _max_rel(gm, model) <= 1e-4
    assert run_pipeline(gm, PassContext(fold_shared_experts=True))[1][-1].rewrites == 0


def test_each_pass_alone():
    model = _model("v2-group-limited")
    gm = _fresh("v2-group-limited")
    assert fuse_gated_mlp(gm, PassContext()).rewrites == 3  # skips the routed experts, leaves them intact
    assert len(_expert_linears(gm)) == 3 * 8 * 2
    assert outline_moe(gm, PassContext()).rewrites == 2  # works on the unfused router (int64 topk ids)
    assert "aten.topk" in op_histogram(gm)
    assert fuse_router(gm, PassContext()).rewrites == 2
    assert _max_rel(gm, model) <= 1e-4


def test_outline_moe_replaces_rather_than_doubles_parameters():
    gm = _fresh()
    before = param_bytes(gm)
    outline_moe(gm, PassContext())
    assert param_bytes(gm) == before


def test_region_that_does_not_check_out_is_reported_and_untouched():
    gm = _fresh()
    cfg = dataclasses.replace(_model("v1-softmax-greedy").config, num_experts_per_tok=3)
    n = len(gm.graph.nodes)
    result = fuse_router(gm, PassContext(config=cfg))
    assert result.rewrites == 0 and len(result.skipped) == 2 and "top_k 3" in result.skipped[0]
    assert len(gm.graph.nodes) == n
    wrong_e = dataclasses.replace(cfg, n_routed_experts=9, num_experts_per_tok=2)
    result = outline_moe(gm, PassContext(config=wrong_e))
    assert result.rewrites == 0 and "9 experts" in result.skipped[0]


@pytest.mark.parametrize("variant,change,feature", [
    ("v1-softmax-greedy", {"norm_topk_prob": True}, "config normalized True, graph computes False"),
    ("v1-norm", {"norm_topk_prob": False}, "config normalized False, graph computes True"),
    ("v2-greedy-scaled", {"routed_scaling_factor": 3.0}, "config scale 3.0, graph computes 2.0"),
    ("v2-group-limited", {"n_group": 2, "topk_group": 1}, "config groups (2, 1, 'max'), graph computes (4, 2, 'max')"),
    ("v2-group-limited", {"topk_method": "greedy"}, "config groups None, graph computes (4, 2, 'max')"),
    ("v3-noaux-tc", {"topk_method": "group_limited_greedy", "scoring_func": "sigmoid"}, "config bias False"),
])
def test_router_whose_graph_disagrees_with_the_config_is_left_alone(variant, change, feature):
    """fuse_router reads the routing off the graph (groups, normalization, scaling, bias) and
    refuses to fuse a router whose graph computes something else than the config says."""
    gm = _captured(variant)  # left as it is: the pass rewrites nothing here
    cfg = dataclasses.replace(_model(variant).config, **change)
    n = len(gm.graph.nodes)
    result = fuse_router(gm, PassContext(config=cfg))
    assert result.rewrites == 0 and len(result.skipped) == 2, result
    assert feature in result.skipped[0], result.skipped[0]
    assert len(gm.graph.nodes) == n


def test_graph_routing_reads_every_variant(variant):
    """What fuse_router reads off each captured router is the config's routing."""
    from dsmoe.passes.fuse_router import _region, expected_routing, graph_routing

    gm = _captured(variant)
    got = graph_routing(_region(gm, "model.layers.1.mlp.gate"))
    assert got == expected_routing(_model(variant).config.routing)


def test_expert_weighted_by_another_experts_ids_is_not_outlined():
    """outline_moe checks that link e of the chain is weighted by ``ids == e``: a graph where
    expert 3 takes expert 4's routing weight is reported, not rewritten."""
    gm = _fresh()
    eqs = [n for n in gm.graph.nodes if n.target == torch.ops.aten.eq.Scalar and n.args[1] == 3]
    assert len(eqs) == 2  # one per MoE layer
    for n in eqs:
        n.args = (n.args[0], 4)
    gm.recompile()
    n = len(gm.graph.nodes)
    result = outline_moe(gm, PassContext())
    assert result.rewrites == 0 and len(result.skipped) == 2
    assert "3 links for 8 experts" in result.skipped[0] and len(gm.graph.nodes) == n


def test_unrelated_graph_is_untouched():
    class Unrelated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(8, 8)
            self.up_proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            s = torch.softmax(self.gate_proj(x), -1)
            v, i = torch.topk(s, 2)
            return torch.nn.functional.silu(self.up_proj(x)) * s, v, i

    gm = torch.export.export(Unrelated(), (torch.randn(4, 8),)).module()
    gm.meta["dsmoe_config"] = _model("v1-softmax-greedy").config
    code = gm.code
    _, reports = run_pipeline(gm, PassContext())
    assert [r.rewrites for r in reports] == [0, 0, 0]
    assert gm.code == code


def test_verification_names_the_pass_that_breaks_numerics(monkeypatch):
    def broken(gm, ctx):
        for n in gm.graph.nodes:
            if n.target == aten.embedding.default:
                with gm.graph.inserting_after(n):
                    m = gm.graph.call_function(aten.mul.Tensor, (n, 1.5))
                n.replace_all_uses_with(m, delete_user_cb=lambda u, m=m: u is not m)
        gm.recompile()
        return pipeline.PassResult(rewrites=1)

    monkeypatch.setattr(pipeline, "PASSES", [("fuse_router", fuse_router), ("broken_pass", broken)])
    with pytest.raises(VerificationError, match="pass broken_pass changed the model's outputs"):
        run_pipeline(_fresh(), PassContext(verify=True))


def test_fused_graph_generates_the_same_tokens_as_eager():
    model = _model("v3-noaux-tc")
    want = greedy_generate(eager_step(model), model.config, [1, 2, 3, 4], 10)
    assert greedy_generate(fused_step(model), model.config, [1, 2, 3, 4], 10) == want


def test_bf16_pipeline_within_bf16_tolerance():
    model = tiny("v1-softmax-greedy", dtype="bfloat16")
    _, reports = run_pipeline(capture(model), PassContext(verify=True))
    assert [r.rewrites for r in reports] == [2, 2, 3]
    assert all(r.rel_err <= VERIFY_RTOL[torch.bfloat16] for r in reports)
