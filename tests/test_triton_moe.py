"""dsmoe::moe's Triton kernels under the interpreter (CPU) against the op's CPU reference.

The sweep (:data:`MOE_CASES`) covers T in {1, 2, 7, 16, 64, 129, 512}, K in {1, 6, 8},
E in {8, 64, 100, 256}, bf16/fp32/fp16, H and I that are not multiples of the block sizes, uneven
loads (all tokens on one expert, empty experts, repeated ids) and every launch configuration
:func:`moe_config` can return (checked below). The reference is the op's CPU implementation in
float64, so only the kernels' own rounding shows; test_cuda_ops.py runs the same sweep on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import dsmoe.ops  # noqa: F401
from dsmoe.plugins import _triton

if not torch.cuda.is_available():
    _triton.enable_interpreter()  # before anything imports triton in compiled mode

from dsmoe.plugins.moe.config import all_moe_configs, moe_config
from dsmoe.plugins.moe.launch import moe_triton

interpreted = pytest.mark.skipif(not _triton.interpreter_active(),
                                 reason="triton is compiled here (CUDA present): test_cuda_ops.py runs this sweep")

# relative error per token row against the float64 reference (16-bit: the kernels round act and y)
MOE_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
TS = (1, 2, 7, 16, 64, 129, 512)
KS = (1, 6, 8)
ES = (8, 64, 100, 256)
LOADS = ("random", "one-expert", "even-experts", "random", "repeated")
DTYPES = (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float16)
HS, IS = (40, 72, 64), (24, 40, 32)

MOE_CASES = [(T, KS[(i + j) % 3], E, HS[(i + j) % 3], IS[(i + 2 * j) % 3], DTYPES[(i + j) % 5], LOADS[(i + j) % 5])
             for i, E in enumerate(ES) for j, T in enumerate(TS)]
MOE_CASES += [(300, 8, 100, 40, 24, torch.bfloat16, "one-expert")]  # 8 experts of 300 rows: 64-row blocks


def make_ids(T, K, E, load, g):
    if load == "one-expert":  # every token on the same K experts (K = 1: all on expert E-1)
        return torch.arange(E - K, E).repeat(T, 1)
    if load == "even-experts":  # odd experts get no tokens
        half = (E + 1) // 2
        return torch.stack([torch.randperm(half, generator=g)[: min(K, half)] * 2 for _ in range(T)]) \
            if half >= K else torch.randint(0, half, (T, K), generator=g) * 2
    if load == "repeated":  # a token may pick an expert twice (the op sums both)
        return torch.randint(0, E, (T, K), generator=g)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])


def make_moe_inputs(T, K, E, H, I, dtype, load, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    ids = make_ids(T, K, E, load, g).to(torch.int32)
    weights = torch.rand(T, K, generator=g) + 0.1
    return x, weights, ids, w13, w2


def moe_reference(x, weights, ids, w13, w2):
    """The op's CPU reference in float64 (the inputs are exact in it)."""
    return torch.ops.dsmoe.moe(x.double(), weights.double(), ids, w13.double(), w2.double(), "silu")


def check_moe(got, ref, dtype):
    assert got.dtype == dtype and got.shape == ref.shape
    got = got.double().cpu()
    assert torch.isfinite(got).all()
    err = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    assert err.max() < MOE_TOL[dtype], f"worst token {int(err.argmax())}: relative error {err.max():.2e}"


@interpreted
@pytest.mark.parametrize("case", [pytest.param(i, marks=pytest.mark.slow) if c[0] >= 129 else i  # large T: make test
                                  for i, c in enumerate(MOE_CASES)])
def test_moe_kernels_match_reference(case):
    T, K, E, H, I, dtype, load = MOE_CASES[case]
    x, weights, ids, w13, w2 = make_moe_inputs(T, K, E, H, I, dtype, load, seed=case)
    check_moe(moe_triton(x, weights, ids, w13, w2, "silu"), moe_reference(x, weights, ids, w13, w2), dtype)


@interpreted
def test_moe_ids_outside_range_contribute_nothing():
    x, weights, ids, w13, w2 = make_moe_inputs(9, 3, 5, 40, 24, torch.float32, "random", seed=11)
    bad = ids.clone()
    bad[::2, 1] = 5
    bad[1, 0] = -1
    valid = (bad >= 0) & (bad < 5)
    ref = moe_reference(x, weights * valid, bad.clamp(0, 4), w13, w2)
    check_moe(moe_triton(x, weights, bad, w13, w2, "silu"), ref, torch.float32)


@interpreted
def test_moe_closed_form_identity_experts():
    """Expert e: gate = up = (e+1)·I on the first H rows, down = identity, so
    y = Σ_k w_k · silu((e_k+1)·x) · (e_k+1)·x, written down directly."""
    T, K, E, H = 5, 2, 4, 16
    x = torch.linspace(-2, 2, T * H).view(T, H)
    eye = torch.eye(H)
    w13 = torch.stack([torch.cat([eye, eye]) * (e + 1) for e in range(E)])
    w2 = torch.stack([eye for _ in range(E)])
    ids = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 1]], dtype=torch.int32)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(0))
    s = (ids.float() + 1).unsqueeze(-1)  # [T,K,1]
    want = (w.unsqueeze(-1) * torch.nn.functional.silu(s * x.unsqueeze(1)) * s * x.unsqueeze(1)).sum(1)
    torch.testing.assert_close(moe_triton(x, w, ids, w13, w2, "silu"), want, rtol=1e-5, atol=1e-5)


def test_sweep_covers_every_moe_config():
    key = lambda c: (c.path, tuple(launch.constexprs for launch in c.launches))  # noqa: E731
    used = {(key(moe_config(T, E, K, H, I, dt, _triton.INTERPRETER_ARCH)), dt != torch.float32)
            for T, K, E, H, I, dt, _ in MOE_CASES}
    for arch in (80, 90):  # the tiles do not depend on the arch (only the stages do)
        want = {(key(c), dts[0] != torch.float32) for c, dts in all_moe_configs(arch)}
        assert used == want
    assert {c[0] for c in MOE_CASES} >= set(TS) and {c[1] for c in MOE_CASES} == set(KS)
    assert {c[5] for c in MOE_CASES} == {torch.float32, torch.bfloat16, torch.float16}
    assert any(c[3] % 64 and c[4] % 32 for c in MOE_CASES)  # H, I not multiples of the tiles


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(3, 16, dtype=torch.float64)), "dtype"),
    (dict(activation="gelu"), "activation"),
    (dict(w2=torch.zeros(4, 16, 7)), "inconsistent"),
    (dict(weights=torch.zeros(3, 1)), "weights"),
    (dict(w13=torch.zeros(4, 16, 16, dtype=torch.bfloat16)), "x's dtype"),
    (dict(w13=torch.zeros(600, 16, 16), w2=torch.zeros(600, 16, 8)), "at most 512"),
])
def test_moe_launcher_rejects_bad_arguments(change, match):
    args = dict(x=torch.zeros(3, 16), weights=torch.zeros(3, 2), ids=torch.zeros(3, 2, dtype=torch.int32),
                w13=torch.zeros(4, 16, 16), w2=torch.zeros(4, 16, 8), activation="silu")
    with pytest.raises(ValueError, match=match) as e:
        moe_triton(**{**args, **change})
    assert "\n" not in str(e.value)
