"""dsmoe::route's Triton kernels under the interpreter (CPU) against the op's CPU reference.

The sweep (:data:`ROUTE_CASES`) covers every routing variant, T in {1, 2, 7, 16, 64, 129, 512},
K in {1, 6, 8}, E in {8, 64, 256}, bf16/fp32/fp16 and a mixed-dtype router, and every launch
configuration :func:`route_config` can return (checked below). The router weights are scaled up
so choices are decisive; a float64 recomputation still drops the rare token whose choice is a
near-tie (the kernel and the reference sum the logits in different orders). test_cuda_ops.py
runs the same sweep on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import dsmoe.ops  # noqa: F401
from dsmoe.plugins import _triton

if not torch.cuda.is_available():
    _triton.enable_interpreter()  # before anything imports triton in compiled mode

from dsmoe.plugins.route.config import all_route_configs, route_config
from dsmoe.plugins.route.launch import route_triton

interpreted = pytest.mark.skipif(not _triton.interpreter_active(),
                                 reason="triton is compiled here (CUDA present): test_cuda_ops.py runs this sweep")

VARIANTS = {  # groups adapt to E in route_case(); K is clipped to what the kept groups hold
    "v1-greedy": dict(scoring="softmax", topk_method="greedy", n_group=1, topk_group=1,
                      norm_topk_prob=False, scaling=1.0, scale_when="unnormalized"),
    "v1-norm": dict(scoring="softmax", topk_method="greedy", n_group=1, topk_group=1,
                    norm_topk_prob=True, scaling=1.0, scale_when="unnormalized"),
    "v2-greedy-scaled": dict(scoring="softmax", topk_method="greedy", n_group=1, topk_group=1,
                             norm_topk_prob=False, scaling=2.0, scale_when="unnormalized"),
    "v2-group-limited": dict(scoring="softmax", topk_method="group_limited_greedy", n_group=8, topk_group=3,
                             norm_topk_prob=False, scaling=16.0, scale_when="unnormalized"),
    "v2-group-limited-norm": dict(scoring="softmax", topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2, norm_topk_prob=True, scaling=16.0, scale_when="unnormalized"),
    "v3-noaux-tc": dict(scoring="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
                        norm_topk_prob=True, scaling=2.5, scale_when="always"),
    "v3-noaux-tc-unnormalized": dict(scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                                     norm_topk_prob=False, scaling=2.5, scale_when="always"),
    "v3-ungrouped": dict(scoring="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                         norm_topk_prob=True, scaling=2.5, scale_when="always"),
}
TS = (1, 2, 7, 16, 64, 129, 512)
KS = (1, 6, 8)
ES = (8, 64, 256)
# (x dtype, w_gate dtype), cycled over the cases
DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float16))


def route_case(i: int, variant: str, E: int, T: int, K: int):
    """(T, H, E, K, attrs, x dtype, w dtype) with the variant's groups fitted to E."""
    attrs = dict(VARIANTS[variant])
    G = attrs["n_group"]
    if G > 1:
        G = min(G, E // 2 if attrs["topk_method"] == "noaux_tc" else E)
        attrs["n_group"], attrs["topk_group"] = G, min(attrs["topk_group"], G)
        K = min(K, attrs["topk_group"] * (E // G))
    xd, wd = DTYPES[i % len(DTYPES)]
    return T, 40 if i % 2 else 64, E, min(K, E), attrs, xd, wd


# every variant at every E, two values of T each, rotating through TS (and K through KS)
ROUTE_CASES = [route_case(i, v, E, TS[(3 * i + j) % len(TS)], KS[(i + j) % len(KS)])
               for i, (v, E) in enumerate((v, E) for v in VARIANTS for E in ES) for j in range(2)]
ROUTE_CASES += [route_case(0, "v3-noaux-tc", 256, 512, 8), route_case(1, "v2-group-limited", 64, 129, 6)]


def make_route_inputs(T, H, E, attrs, xd, wd, seed, same_tokens=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1 if same_tokens else T, H, generator=g).expand(T, H).contiguous().to(xd)
    spread = 4.0 if attrs["scoring"] == "softmax" else 2.0  # decisive, sigmoid not saturated
    w_gate = (torch.randn(E, H, generator=g) * spread / H ** 0.5).to(wd)
    bias = torch.randn(E, generator=g) * 0.1 if attrs["topk_method"] == "noaux_tc" else None
    return x, w_gate, bias


def decisive(x, w_gate, bias, top_k, attrs, rel=2e-5):
    """Tokens whose every choice (kept groups, top-K order, K-th vs (K+1)-th) clears a relative
    margin, recomputed in float64 independently of both implementations."""
    logits = x.double() @ w_gate.double().T
    s = logits.softmax(-1) if attrs["scoring"] == "softmax" else logits.sigmoid()
    c = s if bias is None else s + bias.double()
    T, E = c.shape
    ok = torch.ones(T, dtype=torch.bool)

    def gaps_clear(v, n):  # the first n+1 sorted values are pairwise separated
        top = v.sort(dim=-1, descending=True).values[:, : n + 1]
        gap = top[:, :-1] - top[:, 1:]
        return (gap > rel * top[:, :-1].abs() + 1e-12).all(-1)

    G = attrs["n_group"]
    if attrs["topk_method"] != "greedy" and G > 1:
        grouped = c.view(T, G, E // G)
        gs = grouped.topk(2, -1).values.sum(-1) if attrs["topk_method"] == "noaux_tc" else grouped.max(-1).values
        if attrs["topk_group"] < G:
            ok &= gaps_clear(gs, attrs["topk_group"])
        keep = gs.topk(attrs["topk_group"], -1).indices
        mask = torch.zeros(T, G, dtype=torch.bool).scatter(1, keep, True).repeat_interleave(E // G, 1)
        c = c.masked_fill(~mask, float("-inf"))
    n = min(top_k, int(torch.isfinite(c[0]).sum()) - 1)
    return ok & gaps_clear(c, n) if n >= 1 else ok


def check_route(got, ref, x, w_gate, bias, top_k, attrs):
    (gw, gi), (rw, ri) = (t.cpu() for t in got), (t.cpu() for t in ref)
    x, w_gate, bias = (None if t is None else t.cpu() for t in (x, w_gate, bias))
    T = x.shape[0]
    assert gw.dtype == torch.float32 and gi.dtype == torch.int32
    assert gw.shape == gi.shape == (T, top_k)
    ok = decisive(x, w_gate, bias, top_k, attrs)
    assert ok.float().mean() >= 0.9, f"only {int(ok.sum())}/{T} decisive tokens: make the data decisive"
    assert torch.equal(gi[ok], ri[ok].to(torch.int32))
    torch.testing.assert_close(gw[ok], rw[ok], rtol=1e-4, atol=1e-6)


@interpreted
@pytest.mark.parametrize("case", [pytest.param(i, marks=pytest.mark.slow) if c[0] >= 129 else i  # large T: make test
                                  for i, c in enumerate(ROUTE_CASES)])
def test_route_kernels_match_reference(case):
    T, H, E, K, attrs, xd, wd = ROUTE_CASES[case]
    x, w_gate, bias = make_route_inputs(T, H, E, attrs, xd, wd, seed=case)
    ref = torch.ops.dsmoe.route(x, w_gate, bias, attrs["scoring"], attrs["topk_method"], K, attrs["n_group"],
                                attrs["topk_group"], attrs["norm_topk_prob"], attrs["scaling"], attrs["scale_when"])
    got = route_triton(x, w_gate, bias, top_k=K, **attrs)
    check_route(got, ref, x, w_gate, bias, K, attrs)


@interpreted
@pytest.mark.parametrize("variant", ["v1-greedy", "v3-noaux-tc"])
def test_route_all_tokens_alike(variant):
    T, H, E, K, attrs, xd, wd = route_case(0, variant, 64, 33, 6)
    x, w_gate, bias = make_route_inputs(T, H, E, attrs, xd, wd, seed=7, same_tokens=True)
    ref = torch.ops.dsmoe.route(x, w_gate, bias, top_k=K, **attrs)
    w, ids = route_triton(x, w_gate, bias, top_k=K, **attrs)
    assert (ids == ids[0]).all()  # every token on the same K experts
    check_route((w, ids), ref, x, w_gate, bias, K, attrs)


def test_sweep_covers_every_route_config():
    used = {route_config(T, E, K, H, xd, _triton.INTERPRETER_ARCH) for T, H, E, K, _, xd, _ in ROUTE_CASES}
    for arch in (80, 90):  # the tiles do not depend on the arch (only the stages do)
        want = {(c.path, c.logits.constexprs, c.select.constexprs) for c in all_route_configs(arch)}
        assert {(c.path, c.logits.constexprs, c.select.constexprs) for c in used} == want
    assert {T for T, *_ in ROUTE_CASES} == set(TS) and {E for _, _, E, *_ in ROUTE_CASES} == set(ES)
    assert set(KS) <= {K for *_, K, _, _, _ in ROUTE_CASES}
    assert {v["topk_method"] for *_, v, _, _ in ROUTE_CASES} == {"greedy", "group_limited_greedy", "noaux_tc"}


@pytest.mark.parametrize("kw, match", [
    (dict(x=torch.zeros(2, 8, dtype=torch.float64)), "dtype"),
    (dict(w_gate=torch.zeros(300, 8)), "E <= 256"),
    (dict(top_k=9, w_gate=torch.zeros(16, 8)), "top_k"),
    (dict(w_gate=torch.zeros(16, 9)), "want x"),
    (dict(bias=torch.zeros(5)), "bias"),
    (dict(n_group=3), "n_group"),
    (dict(scoring="tanh"), "scoring"),
])
def test_route_launcher_rejects_bad_arguments(kw, match):
    args = dict(x=torch.zeros(2, 8), w_gate=torch.zeros(16, 8), bias=None, scoring="softmax",
                topk_method="group_limited_greedy", top_k=2, n_group=4, topk_group=2, norm_topk_prob=False,
                scaling=1.0, scale_when="unnormalized")
    with pytest.raises(ValueError, match=match) as e:
        route_triton(**{**args, **kw})
    assert "\n" not in str(e.value)
