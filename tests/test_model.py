"""The reference model: routing closed forms, transformers as a peer, cache and generation."""

import math

import pytest
import torch
import transformers
from conftest import ROUTING_VARIANTS, tiny

from dsmoe.app.generate import eager_step, greedy_generate
from dsmoe.config import DeepseekConfig
from dsmoe.routing import route


def _route(logits, bias=None, **kw):
    """Route with x = logits and W = I, so the router logits are exactly ``logits``."""
    logits = torch.tensor(logits, dtype=torch.float32)
    E = logits.shape[-1]
    spec = dict(scoring="softmax", topk_method="greedy", top_k=2, n_group=1, topk_group=1,
                norm_topk_prob=False, scaling=1.0, scale_when="unnormalized") | kw
    w, ids = route(logits, torch.eye(E), None if bias is None else torch.tensor(bias), **spec)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    order = ids.argsort(dim=-1)
    return ids.gather(1, order).tolist(), w.gather(1, order).tolist()


def test_softmax_greedy_closed_form():
    ids, w = _route([[3.0, 1.0, 2.0, 0.0]])
    z = math.exp(3) + math.exp(1) + math.exp(2) + 1
    assert ids == [[0, 2]]
    assert w[0] == pytest.approx([math.exp(3) / z, math.exp(2) / z], rel=1e-6)


def test_normalize_then_no_scale_v2():
    _, w = _route([[3.0, 1.0, 2.0, 0.0]], norm_topk_prob=True, scaling=16.0)
    assert w[0] == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], rel=1e-6)  # V2: no scaling after norm


def test_scale_without_norm_v2():
    _, w = _route([[0.0, 0.0, 0.0, 0.0]], scaling=16.0)
    assert w[0] == pytest.approx([4.0, 4.0])


def test_group_limited_greedy_masks_groups_by_max():
    # groups {0,1} {2,3} {4,5} {6,7}; group maxima 5, 4.5, 0.5, 0 → topk_group=1 keeps group 0 only.
    # Greedy over all picks experts 0 and 2 (5, 4.5); group-limited must pick 0 and 1.
    logits = [[5.0, -1.0, 4.5, 4.4, 0.5, 0.0, 0.0, 0.0]]
    ids, w = _route(logits, topk_method="group_limited_greedy", n_group=4, topk_group=1)
    assert ids == [[0, 1]]
    z = sum(math.exp(v) for v in logits[0])
    assert w[0] == pytest.approx([math.exp(5) / z, math.exp(-1) / z], rel=1e-6)
    ids_greedy, _ = _route(logits)
    assert ids_greedy == [[0, 2]]


def test_noaux_tc_bias_selects_but_does_not_weigh():
    # sigmoid scores; the bias pushes expert 3 into the top-2 but the weight is its unbiased score
    logits = [[2.0, 1.0, 0.0, -1.0]]
    bias = [0.0, 0.0, 0.0, 1.0]
    ids, w = _route(logits, bias, scoring="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                    scaling=2.5, scale_when="always")
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert ids == [[0, 3]]
    assert w[0] == pytest.approx([2.5 * s(2.0), 2.5 * s(-1.0)], rel=1e-6)


def test_noaux_tc_groups_by_top2_sum_then_normalize_and_scale():
    # 2 groups of 4; biased scores: group 0 has one high expert, group 1 two medium ones.
    # max would keep group 0; top-2 sum keeps group 1.
    sig_inv = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = [[sig_inv(0.9), sig_inv(0.1), sig_inv(0.1), sig_inv(0.1),
               sig_inv(0.6), sig_inv(0.6), sig_inv(0.2), sig_inv(0.1)]]
    ids, w = _route(logits, [0.0] * 8, scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                    norm_topk_prob=True, scaling=2.5, scale_when="always")
    assert ids == [[4, 5]]
    assert w[0] == pytest.approx([1.25, 1.25], rel=1e-5)


def _hf_moe(model_cfg: DeepseekConfig, ours):
    """transformers' own DeepSeek-V2/V3 MoE block with our weights."""
    r = model_cfg.routing
    common = dict(hidden_size=model_cfg.hidden_size, moe_intermediate_size=model_cfg.moe_intermediate_size,
                  n_routed_experts=model_cfg.n_routed_experts, num_experts_per_tok=r.top_k,
                  n_shared_experts=model_cfg.n_shared_experts, n_group=r.n_group, topk_group=r.topk_group,
                  routed_scaling_factor=r.scaling, hidden_act="silu")
    if r.topk_method == "noaux_tc":
        cfg = transformers.DeepseekV3Config(**common, norm_topk_prob=model_cfg.norm_topk_prob)
        hf = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**common, topk_method=r.topk_method)
        hf = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe(cfg)
    E = model_cfg.n_routed_experts
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        if ours.gate.e_score_correction_bias is not None:
            hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        hf.experts.gate_up_proj.copy_(torch.stack([torch.cat([ours.experts[j].gate_proj.weight,
                                                              ours.experts[j].up_proj.weight]) for j in range(E)]))
        hf.experts.down_proj.copy_(torch.stack([ours.experts[j].down_proj.weight for j in range(E)]))
        for p in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, p).weight.copy_(getattr(ours.shared_experts, p).weight)
    return hf.eval()


# transformers' V2 router has no renormalization, so the peer covers the variants it implements
PEER_VARIANTS = [v for v, o in ROUTING_VARIANTS.items() if not (o.get("norm_topk_prob") and o.get("topk_method") != "noaux_tc")]


@pytest.mark.parametrize("variant", PEER_VARIANTS)
@pytest.mark.parametrize("T", [1, 9])
def test_moe_block_matches_transformers(variant, T):
    model = tiny(variant)
    ours = model.model.layers[1].mlp
    hf = _hf_moe(model.config, ours)
    x = torch.randn(1, T, model.config.hidden_size, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)


def test_moe_forward_is_routed_plus_shared():
    """MoE output = Σ_k w_k expert_k(x) + shared(x), checked token by token."""
    model = tiny("v3-noaux-tc")
    moe = model.model.layers[1].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        w, ids = moe.gate(x)
        want = torch.stack([sum(w[t, k] * moe.experts[int(ids[t, k])](x[t]) for k in range(ids.shape[1]))
                            + moe.shared_experts(x[t]) for t in range(5)])
        torch.testing.assert_close(moe(x.unsqueeze(0))[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["v1-softmax-greedy", "v3-noaux-tc"])
def test_cached_decoding_equals_full_forward(variant):
    model = tiny(variant)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model(ids[:, :5], use_cache=True)
        steps = [logits]
        for t in range(5, 9):
            logits, cache = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache[0][0].shape == (2, model.config.num_key_value_heads, 9, model.config.head_dim)


def test_left_padding_mask_matches_unpadded():
    model = tiny()
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask, pos)[:, 2:], model(ids), rtol=1e-5, atol=1e-5)


def test_generation_is_deterministic_and_uses_the_cache():
    model = tiny()
    step = eager_step(model)
    a = greedy_generate(step, model.config, [1, 5, 9], 8)
    b = greedy_generate(step, model.config, [1, 5, 9], 8)
    assert a == b and len(a) == 8
    # the cached path gives the tokens a full forward would pick
    seq = [1, 5, 9]
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[3:] == a


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = tiny(seed=1), tiny(seed=1), tiny(seed=2)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
