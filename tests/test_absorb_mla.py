"""absorb_mla and dsmoe::mla_attention: the op against the model's expanded attention, the pass's
counts, numerics, idempotence and refusals, and decoding with the latent cache step by step."""

from __future__ import annotations

import functools

import pytest
import torch

import dsmoe
from dsmoe.app.cuda_graphs import StaticDecoder, static_length
from dsmoe.app.generate import eager_step, greedy_generate
from dsmoe.cache import cache_layout
from dsmoe.ir import capture, op_histogram, param_bytes, sample_inputs
from dsmoe.ops import MLA_ATTENTION, mla_absorbed_is_cheaper, mla_attention_reference
from dsmoe.passes.absorb_mla import absorb_mla
from dsmoe.passes.context import PassContext
from dsmoe.passes.graph import scope_nodes
from dsmoe.passes.pipeline import run_pipeline

aten = torch.ops.aten
# the MLA variants: q_lora set (mla-tiny), q_proj (V2-Lite's), V3 routing with plain RoPE layout
MLA_VARIANTS = {
    "q-lora": {},
    "q-proj": {"q_lora_rank": None},
    "v3-rotate-half": {"model_type": "deepseek_v3", "rope_interleave": False, "scoring_func": "sigmoid",
                       "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
                       "routed_scaling_factor": 2.5, "rope_scaling": None},
}


@functools.cache
def _model(variant: str):
    model = dsmoe.load("preset:mla-tiny", overrides=MLA_VARIANTS[variant])
    with torch.no_grad():  # decisive routing (no near-ties between implementations)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(10.0)
    return model


def rel_err(ref, got) -> float:
    return ((ref.float() - got.float()).abs().max() / ref.float().abs().max()).item()


# ---- the op -------------------------------------------------------------------------------------

@pytest.mark.parametrize("S,past", [(1, 0), (1, 40), (5, 0), (6, 9)])
@pytest.mark.parametrize("form", ["absorbed", "expanded", "auto"])
def test_op_equals_the_models_expanded_attention(S, past, form):
    """Both forms of the op on kv_b_proj's halves vs the reference model's ``attend``."""
    attn = _model("q-lora").model.layers[0].self_attn
    nh, dn, dr, dv, R = attn.num_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_lora_rank
    g = torch.Generator().manual_seed(S * 100 + past)
    B, L = 2, past + S
    q_nope, q_rope = torch.randn(B, nh, S, dn, generator=g), torch.randn(B, nh, S, dr, generator=g)
    latent = torch.randn(B, 1, L, R + dr, generator=g)
    causal = torch.arange(L)[None, :] <= (torch.arange(S)[:, None] + past)
    mask = torch.where(causal, 0.0, torch.finfo(torch.float32).min).expand(B, 1, S, L)
    w = attn.kv_b_proj.weight.view(nh, dn + dv, R)
    with torch.no_grad():
        ref = attn.attend(q_nope, q_rope, latent, mask)
        got = mla_attention_reference(q_nope, q_rope, latent, w[:, :dn], w[:, dn:], mask, attn.softmax_scale, form=form)
    assert got.shape == ref.shape == (B, S, nh * dv)
    assert rel_err(ref, got) <= 1e-5


def test_form_choice_follows_the_flops():
    """V2-Lite's dims: decode (S=1) takes the absorbed form at any context; a prefill from an
    empty cache takes the expanded one."""
    dims = dict(nh=16, d_nope=128, d_rope=64, d_v=128, R=512)
    assert all(mla_absorbed_is_cheaper(1, L, **dims) for L in (2, 128, 4096))
    assert not any(mla_absorbed_is_cheaper(S, S, **dims) for S in (16, 128, 4096))


# ---- the pass -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["q-lora", "v3-rotate-half"])  # q-proj: the two tests below
def test_pipeline_absorbs_every_mla_layer(variant):
    model = _model(variant)
    L = model.config.num_hidden_layers
    gm, reports = run_pipeline(capture(model), PassContext(verify=True))
    assert [(r.name, r.rewrites) for r in reports] == [("fuse_router", 2), ("outline_moe", 2), ("fuse_gated_mlp", 3),
                                                       ("absorb_mla", L)]
    absorb = reports[-1]
    assert absorb.rel_err <= 1e-4 and absorb.skipped == []
    ops = op_histogram(gm)
    assert ops["dsmoe::mla_attention"] == L and ops.get("aten.softmax", 0) == 0 and ops.get("aten.matmul", 0) == 0
    names = {n for n, _ in gm.named_parameters()}
    assert not any("kv_b_proj" in n for n in names) and "lm.model.layers.0.self_attn.w_uk" in names
    nh, dn, dv, R = 4, 16, 16, 32
    w_uk, w_uv = (dict(gm.named_parameters())[f"lm.model.layers.2.self_attn.{k}"] for k in ("w_uk", "w_uv"))
    assert w_uk.shape == (nh, dn, R) and w_uv.shape == (nh, dv, R)
    kv_b = model.model.layers[2].self_attn.kv_b_proj.weight.view(nh, dn + dv, R)
    assert torch.equal(w_uk, kv_b[:, :dn]) and torch.equal(w_uv, kv_b[:, dn:])
    again = run_pipeline(gm, PassContext())[1]
    assert [r.rewrites for r in again] == [0, 0, 0, 0]


def test_pass_alone_keeps_parameter_bytes_and_numerics():
    model = _model("q-proj")
    gm = capture(model)
    before = param_bytes(gm)
    assert absorb_mla(gm, PassContext()).rewrites == 3
    assert param_bytes(gm) == before  # w_uk + w_uv replace kv_b_proj.weight
    for args in (sample_inputs(model.config, batch=2, seq=7, past=0, seed=1),
                 sample_inputs(model.config, batch=3, seq=1, past=9, seed=2)):
        with torch.no_grad():
            ref, ref_cache = model(*args, use_cache=True)
            got, cache = gm(*args)
        assert rel_err(ref, got) <= 1e-4
        assert [t.shape for layer in cache for t in layer] == [t.shape for layer in ref_cache for t in layer]
    assert absorb_mla(gm, PassContext()).rewrites == 0


def _tamper_scale(gm):
    n = next(n for n in gm.graph.nodes if n.target == aten.mul.Tensor and isinstance(n.args[1], float)
             and "self_attn" in str(n.meta.get("nn_module_stack")))
    n.args = (n.args[0], n.args[1] * 1.5)


def _tamper_values(gm):
    """Layer 0 attends over its keys' nope half instead of its values."""
    pv = next(n for n in gm.graph.nodes if n.target == aten.matmul.default and n.args[1].target != aten.transpose.int)
    split = pv.args[1].args[0]
    k_nope = next(u for u in split.users if u.args[1] == 0)
    pv.args = (pv.args[0], k_nope)


@pytest.mark.parametrize("tamper,reason", [(_tamper_scale, "the graph scales scores by"),
                                           (_tamper_values, "keys and values are not the [16, 16] split")])
def test_tampered_attention_is_refused_and_left_alone(tamper, reason):
    gm = capture(_model("q-lora"))
    tamper(gm)
    gm.graph.eliminate_dead_code()  # what the tampering left unused
    gm.recompile()
    layer0 = [n.name for n in scope_nodes(gm, "model.layers.0.self_attn")]
    result = absorb_mla(gm, PassContext())
    assert result.rewrites == 2 and len(result.skipped) == 1, result  # the other two layers are absorbed
    assert result.skipped[0].startswith("model.layers.0.self_attn: ") and reason in result.skipped[0], result.skipped
    assert [n.name for n in scope_nodes(gm, "model.layers.0.self_attn")] == layer0  # untouched, not half-rewritten
    assert sum(1 for n in gm.graph.nodes if n.target == MLA_ATTENTION) == 2


def test_mha_model_is_untouched():
    gm = capture(dsmoe.load("preset:tiny"))
    code = gm.code
    assert absorb_mla(gm, PassContext()).rewrites == 0 and gm.code == code


# ---- decoding with the latent cache ---------------------------------------------------------

@functools.cache
def _fused(variant: str):
    return run_pipeline(capture(_model(variant)), PassContext())[0]


def test_absorbed_decode_equals_the_expanded_model_for_32_steps():
    """Prefill, then 32 decode steps fed eager's tokens: the absorbed graph's logits and latent
    cache equal the eager (expanded) model's at every step, and it picks the same tokens."""
    model, fused = _model("q-proj"), _fused("q-proj")
    assert op_histogram(fused)["dsmoe::mla_attention"] == 3
    prompt = torch.tensor([[1, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        ref, ref_cache = model(prompt, use_cache=True)
        got, cache = fused(prompt, torch.ones(1, 6, dtype=torch.int64), torch.arange(6)[None], cache_layout(model.config).empty(1))
        for step in range(32):
            assert rel_err(ref, got) <= 1e-4, step
            for (a,), (b,) in zip(ref_cache, cache):
                assert a.shape == b.shape == (1, 1, 6 + step, 40) and rel_err(a, b) <= 1e-4
            nxt = ref[:, -1:].argmax(-1)
            assert torch.equal(nxt, got[:, -1:].argmax(-1)), step
            P = 6 + step
            args = (nxt, torch.ones(1, P + 1, dtype=torch.int64), torch.tensor([[P]]))
            ref, ref_cache = model(*args, ref_cache, use_cache=True)
            got, cache = fused(*args, cache)
    assert greedy_generate(fused, model.config, [1, 17, 42], 20) == greedy_generate(eager_step(model), model.config,
                                                                                     [1, 17, 42], 20)


def test_static_cache_decoder_takes_the_latent_cache():
    """The static-cache (CUDA-graph shape) decoder over the latent cache, on the CPU: the same
    tokens as eager, the cache reused in place."""
    model, fused = _model("q-proj"), _fused("q-proj")
    want = greedy_generate(eager_step(model), model.config, [5, 4, 3, 2], 10)
    dec = StaticDecoder(fused, model.config, max_len=static_length(14))
    assert greedy_generate(dec, model.config, [5, 4, 3, 2], 10) == want
    assert [t.shape for t in dec.cache[0]] == [(1, 1, 64, 40)]
