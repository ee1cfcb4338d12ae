"""The fused ops: closed-form MoE cases and sweeps against independent per-token reference math."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROUTING_VARIANTS, reference_route
from hypothesis import given, settings
from hypothesis import strategies as st

import dsmoe.ops  # noqa: F401  (registers the ops)
from dsmoe.config import DeepseekConfig
from dsmoe.model import MoEGate

ops = torch.ops.dsmoe


def per_token_moe(x, w, ids, w13, w2):
    """The contract, one token and one slot at a time (no grouping): the independent reference."""
    I = w2.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            g, u = w13[e, :I].double() @ x[t].double(), w13[e, I:].double() @ x[t].double()
            y[t] += float(w[t, k]) * (w2[e].double() @ (F.silu(g) * u))
    return y


def test_moe_closed_form_identity_experts():
    """Expert e is (e+1)·identity-like: gate rows all ones → silu(Σx), up = (e+1)·x, down = I."""
    H = I = 4
    E = 3
    w13 = torch.zeros(E, 2 * I, H)
    w2 = torch.zeros(E, H, I)
    for e in range(E):
        w13[e, :I] = torch.eye(H) * 0 + 1.0 / H  # gate: mean of x on every unit
        w13[e, I:] = torch.eye(H) * (e + 1)
        w2[e] = torch.eye(H)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 4.0]])
    ids = torch.tensor([[0, 2], [1, 1]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    y = ops.moe(x, w, ids, w13, w2, "silu")
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    want0 = [(0.5 * 1 + 0.25 * 3) * silu(2.5) * xi for xi in x[0].tolist()]
    want1 = [(1.0 * 2 + 2.0 * 2) * silu(1.0) * xi for xi in x[1].tolist()]
    torch.testing.assert_close(y, torch.tensor([want0, want1]), rtol=1e-6, atol=1e-6)


def test_moe_all_tokens_on_one_expert_and_unused_experts():
    g = torch.Generator().manual_seed(0)
    T, H, I, E, K = 17, 8, 6, 5, 1
    x, w13, w2 = torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    ids = torch.full((T, K), 3, dtype=torch.int32)
    w = torch.rand(T, K, generator=g)
    torch.testing.assert_close(ops.moe(x, w, ids, w13, w2, "silu").double(), per_token_moe(x, w, ids, w13, w2),
                               rtol=1e-5, atol=1e-5)


def test_moe_rejects_out_of_range_ids():
    x, w13, w2 = torch.zeros(1, 4), torch.zeros(2, 4, 4), torch.zeros(2, 4, 2)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 2\)"):
        ops.moe(x, torch.ones(1, 1), torch.tensor([[2]]), w13, w2, "silu")


@settings(max_examples=40, deadline=None)
@given(T=st.sampled_from([1, 2, 7, 33]), E=st.sampled_from([3, 8, 12]), K=st.integers(1, 3),
       H=st.sampled_from([8, 16]), I=st.sampled_from([4, 12]), seed=st.integers(0, 2**16))
def test_moe_matches_per_token_reference(T, E, K, H, I, seed):
    g = torch.Generator().manual_seed(seed)
    x, w13, w2 = torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K, generator=g)
    y = ops.moe(x, w, ids, w13, w2, "silu")
    assert y.shape == (T, H) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), per_token_moe(x, w, ids, w13, w2), rtol=1e-4, atol=1e-4)


def test_moe_bf16_accumulates_in_fp32():
    g = torch.Generator().manual_seed(1)
    T, H, I, E, K = 9, 16, 8, 4, 2
    x, w13, w2 = torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K, generator=g)
    y = ops.moe(x.bfloat16(), w, ids, w13.bfloat16(), w2.bfloat16(), "silu")
    assert y.dtype == torch.bfloat16
    ref = per_token_moe(x.bfloat16().float(), w, ids, w13.bfloat16().float(), w2.bfloat16().float())
    # bf16 products, fp32 accumulation: error relative to the output's scale stays at bf16 precision
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_gated_mlp_matches_swiglu():
    g = torch.Generator().manual_seed(2)
    x, wg, wu, wd = (torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g),
                     torch.randn(8, 6, generator=g))
    want = (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    torch.testing.assert_close(ops.gated_mlp(x, torch.cat([wg, wu]), wd, "silu"), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(list(ROUTING_VARIANTS)), T=st.sampled_from([1, 2, 5, 64]), K=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_route_op_matches_an_independent_router(variant, T, K, seed):
    """``dsmoe::route`` (and through it the model's router, which runs the same function) against
    :func:`conftest.reference_route`, a per-token plain-Python router written from the spec."""
    config = DeepseekConfig.from_name("tiny", num_experts_per_tok=K, **ROUTING_VARIANTS[variant])
    gate = MoEGate(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.1)
    x = torch.randn(T, config.hidden_size, generator=g)
    spec = config.routing.as_kwargs()
    w, ids = ops.route(x, gate.weight, gate.e_score_correction_bias, **spec)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (T, K)
    w_model, ids_model = gate(x)
    assert torch.equal(ids_model, ids) and torch.equal(w_model, w)
    logits = (x.double() @ gate.weight.double().T).tolist()
    bias = gate.e_score_correction_bias.tolist() if gate.e_score_correction_bias is not None else None
    for t in range(T):
        want = reference_route(logits[t], bias, spec)
        got = sorted(zip(ids[t].tolist(), w[t].tolist()))
        assert [e for e, _ in got] == [e for e, _ in want], (t, got, want)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-7)


def test_fake_shapes_under_export():
    class M(torch.nn.Module):
        def forward(self, x, wg, w13, w2):
            w, ids = ops.route(x, wg, None, "softmax", "greedy", 2, 1, 1, False, 1.0, "unnormalized")
            return ops.moe(x, w, ids, w13, w2, "silu")

    args = (torch.randn(5, 8), torch.randn(4, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 3))
    ep = torch.export.export(M(), args, dynamic_shapes=({0: torch.export.Dim("T")}, None, None, None))
    out = ep.module()(torch.randn(9, 8), *args[1:])
    assert out.shape == (9, 8)
