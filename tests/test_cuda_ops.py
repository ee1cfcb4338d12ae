"""CUDA kernels of dsmoe::route and dsmoe::moe against the CPU reference ops (GPU only)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsmoe.ops  # noqa: F401
from dsmoe import plugins

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative Frobenius error allowed for y against the CPU reference (which rounds its
# intermediates to the dtype; the kernels keep fp32 until the end)
MOE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
VARIANTS = {
    "v1": dict(scoring="softmax", topk_method="greedy", n_group=1, topk_group=1,
               norm_topk_prob=False, scaling=1.0, scale_when="unnormalized"),
    "v1_norm": dict(scoring="softmax", topk_method="greedy", n_group=1, topk_group=1,
                    norm_topk_prob=True, scaling=1.0, scale_when="unnormalized"),
    "v2": dict(scoring="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
               norm_topk_prob=False, scaling=16.0, scale_when="unnormalized"),
    "v3": dict(scoring="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
               norm_topk_prob=True, scaling=2.5, scale_when="always"),
    "v3_unnorm": dict(scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                      norm_topk_prob=False, scaling=2.5, scale_when="always"),
    "sigmoid_greedy": dict(scoring="sigmoid", topk_method="greedy", n_group=1, topk_group=1,
                           norm_topk_prob=False, scaling=1.0, scale_when="always"),
}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    assert plugins.register_cuda_kernels() is True, plugins.cuda_kernels_status()


def _poison_cuda_cache(nbytes=256 << 20):
    """Fill memory the caching allocator will hand out next with NaN, so that an output element
    a kernel forgets to write shows up instead of reading as a stale plausible value."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def _dense(weights, ids, E):
    return torch.zeros(weights.shape[0], E, dtype=torch.float64).scatter_(1, ids.long().cpu(), weights.double().cpu())


def check_route(x, w_gate, bias, top_k, attrs):
    ref_w, ref_ids = torch.ops.dsmoe.route(x.cpu(), w_gate.cpu(), None if bias is None else bias.cpu(),
                                           top_k=top_k, **attrs)
    _poison_cuda_cache()
    got_w, got_ids = torch.ops.dsmoe.route(x.cuda(), w_gate.cuda(), None if bias is None else bias.cuda(),
                                           top_k=top_k, **attrs)
    assert got_w.dtype == torch.float32 and got_ids.dtype == torch.int32
    assert got_w.shape == got_ids.shape == (x.shape[0], top_k)
    assert torch.isfinite(got_w).all()
    E = w_gate.shape[0]
    got_ids = got_ids.cpu()
    assert int(got_ids.min()) >= 0 and int(got_ids.max()) < E
    assert all(len(set(r.tolist())) == top_k for r in got_ids)
    # Compare the dense [T,E] routing matrices; skip tokens whose K-th/(K+1)-th choice is a near
    # tie (fp32 sums in another order may then pick either expert).
    d_ref, d_got = _dense(ref_w, ref_ids, E), _dense(got_w, got_ids, E)
    ok = _clear_margin(x, w_gate, bias, top_k, attrs)
    assert ok.float().mean() > 0.9
    torch.testing.assert_close(d_got[ok], d_ref[ok], rtol=1e-4, atol=1e-5)


def _clear_margin(x, w_gate, bias, top_k, attrs, eps=1e-4):
    logits = x.double().cpu() @ w_gate.double().cpu().T
    s = logits.softmax(-1) if attrs["scoring"] == "softmax" else logits.sigmoid()
    c = s if bias is None else s + bias.double().cpu()
    if c.shape[1] <= top_k:
        return torch.ones(c.shape[0], dtype=torch.bool)
    top = c.topk(top_k + 1, dim=-1).values
    return (top[:, -2] - top[:, -1]) > eps  # also near-ties between groups fall out here mostly


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.sampled_from([1, 2, 7, 64, 300, 1000]), H=st.sampled_from([8, 33, 128, 512]),
       E=st.sampled_from([8, 16, 64, 160]), variant=st.sampled_from(sorted(VARIANTS)),
       dtype=st.sampled_from(DTYPES), w_fp32=st.booleans(), seed=st.integers(0, 2**16))
def test_route_matches_reference(T, H, E, variant, dtype, w_fp32, seed):
    attrs = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    top_k = min(6, E // attrs["n_group"] * attrs["topk_group"])
    x = torch.randn(T, H, generator=g).to(dtype)
    w_gate = (torch.randn(E, H, generator=g) / H ** 0.5).to(torch.float32 if w_fp32 else dtype)
    bias = torch.randn(E, generator=g) * 0.1 if attrs["topk_method"] == "noaux_tc" else None
    check_route(x, w_gate, bias, top_k, attrs)


@pytest.mark.parametrize("top_k", [1, 8])
def test_route_v3_full_size(top_k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 7168, generator=g).to(torch.bfloat16)
    w_gate = (torch.randn(256, 7168, generator=g) / 7168 ** 0.5).to(torch.bfloat16)
    bias = torch.randn(256, generator=g) * 0.1
    attrs = {**VARIANTS["v3"], "n_group": 8, "topk_group": 4}
    check_route(x, w_gate, bias, top_k, attrs)


def _moe_inputs(T, K, E, H, I, dtype, seed, ids=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if K <= E else \
            torch.randint(0, E, (T, K), generator=g)
    weights = torch.rand(T, K, generator=g)
    return x, weights, ids.to(torch.int32), w13, w2


def check_moe(x, weights, ids, w13, w2, **launch):
    from dsmoe.plugins.moe.launch import moe_cuda

    ref = torch.ops.dsmoe.moe(x.double() if x.dtype == torch.float32 else x, weights, ids,
                              w13.double() if x.dtype == torch.float32 else w13,
                              w2.double() if x.dtype == torch.float32 else w2, "silu").double()
    cuda = [t.cuda() for t in (x, weights, ids, w13, w2)]
    _poison_cuda_cache()
    got = moe_cuda(*cuda, "silu", **launch) if launch else torch.ops.dsmoe.moe(*cuda, "silu")
    torch.cuda.synchronize()
    assert got.dtype == x.dtype and got.shape == x.shape
    got = got.double().cpu()
    assert torch.isfinite(got).all()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < MOE_TOL[x.dtype], f"relative error {err:.2e} ({launch})"


@settings(max_examples=40, deadline=None)
@given(T=st.sampled_from([1, 3, 16, 17, 100, 700]), K=st.sampled_from([1, 2, 6]),
       E=st.sampled_from([1, 3, 8, 13, 64]), H=st.sampled_from([16, 64, 136, 256]),
       I=st.sampled_from([8, 24, 96, 200]), dtype=st.sampled_from(DTYPES),
       path=st.sampled_from(["auto", "dec", "pre", "simt"]), combine=st.sampled_from(["reduce", "atomic"]),
       seed=st.integers(0, 2**16))
def test_moe_matches_reference(T, K, E, H, I, dtype, path, combine, seed):
    if path in ("dec", "pre") and dtype == torch.float32:
        path = "simt"
    check_moe(*_moe_inputs(T, K, E, H, I, dtype, seed), path=path, combine=combine)


@pytest.mark.parametrize("H, I", [(30, 12), (64, 20)])  # not multiples of 8 -> SIMT path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_odd_shapes(H, I, dtype):
    check_moe(*_moe_inputs(9, 2, 5, H, I, dtype, 1))


@pytest.mark.parametrize("path", ["dec", "pre", "simt"])
@pytest.mark.parametrize("T", [1, 16384])
def test_moe_all_tokens_on_one_expert(path, T):
    ids = torch.full((T, 1), 5, dtype=torch.int32)
    check_moe(*_moe_inputs(T, 1, 7, 64, 32, torch.bfloat16, 2, ids=ids), path=path)


@pytest.mark.parametrize("combine", ["reduce", "atomic"])
def test_moe_experts_without_tokens_and_large_T(combine):
    T, K, E = 16384, 6, 60  # E not a power of two; ids only hit even experts
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E // 2, generator=g)[:K] * 2 for _ in range(T)])
    check_moe(*_moe_inputs(T, K, E, 256, 128, torch.bfloat16, 3, ids=ids), combine=combine)


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 4, 64, 2048])
def test_moe_deepseek_16b_layer(T):
    check_moe(*_moe_inputs(T, 6, 64, 2048, 1408, torch.bfloat16, T))


def test_registered_ops_dispatch_to_cuda():
    x, weights, ids, w13, w2 = (t.cuda() for t in _moe_inputs(4, 2, 8, 64, 32, torch.bfloat16, 5))
    y = torch.ops.dsmoe.moe(x, weights, ids, w13, w2, "silu")
    w, i = torch.ops.dsmoe.route(x, torch.randn(8, 64, device="cuda"), None, "softmax", "greedy", 2, 1, 1,
                                 False, 1.0, "unnormalized")
    assert y.is_cuda and w.is_cuda and i.is_cuda and i.dtype == torch.int32
    assert plugins.register_cuda_kernels() is True  # idempotent


def test_grouped_mm_baseline_on_cuda():
    x, weights, ids, w13, w2 = _moe_inputs(64, 6, 16, 128, 64, torch.bfloat16, 7)
    ref = torch.ops.dsmoe.moe(x, weights, ids, w13, w2, "silu").double()
    try:
        got = plugins.grouped_mm_moe(*(t.cuda() for t in (x, weights, ids, w13, w2)))
    except RuntimeError as e:
        pytest.skip(f"torch._grouped_mm unsupported here: {e}")
    assert ((got.double().cpu() - ref).norm() / ref.norm()) < 2e-2


# ---- the fused graph on CUDA: generation, CUDA-graph decode, the bench backends ---------------

def test_fused_generation_on_cuda_equals_eager_on_cpu():
    """fp32 (SIMT moe path, fp32 routing): greedy tokens of the fused graph on the GPU, with and
    without CUDA-graph decode, equal the eager model's on the CPU."""
    import dsmoe
    from dsmoe.runtime import StaticDecoder, eager_step, fused_step, greedy_generate, static_length

    prompt, n = [1, 17, 42, 7, 99], 12
    cpu = dsmoe.load("preset:tiny", overrides=VARIANT_OVERRIDES)
    ref = greedy_generate(eager_step(cpu), cpu.config, prompt, n)
    gpu = dsmoe.load("preset:tiny", overrides=VARIANT_OVERRIDES, device="cuda")
    for (a, b) in zip(cpu.state_dict().values(), gpu.state_dict().values()):
        if a.dtype.is_floating_point:  # built on the GPU from the CUDA generator: copy the CPU weights
            b.copy_(a)
    gm = fused_step(gpu)
    assert greedy_generate(gm, gpu.config, prompt, n, device="cuda") == ref
    dec = StaticDecoder(gm, gpu.config, max_len=static_length(len(prompt) + n), device="cuda", cuda_graph=True)
    assert greedy_generate(dec, gpu.config, prompt, n, device="cuda") == ref
    assert dec.replays == n - 1  # every decode step replayed the graph


VARIANT_OVERRIDES = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
                     "norm_topk_prob": True, "routed_scaling_factor": 2.5}


def test_cuda_graph_decode_matches_plain_cuda_steps_bf16():
    import dsmoe
    from dsmoe.runtime import StaticDecoder, empty_cache, fused_step

    m = dsmoe.load("preset:small", overrides={"num_hidden_layers": 2}, dtype="bfloat16", device="cuda")
    gm = fused_step(m)
    c = m.config
    dec = StaticDecoder(gm, c, max_len=64, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, c.vocab_size, (1, 9), device="cuda")
    args = (ids, torch.ones(1, 9, dtype=torch.int64, device="cuda"), torch.arange(9, device="cuda")[None])
    empty = empty_cache(c, 1, torch.bfloat16, "cuda")
    (_, p_ref), (_, p_got) = gm(*args, empty), dec(*args, empty)
    for i in range(5):
        pos = 9 + i
        a = (torch.full((1, 1), 3 + i, device="cuda"), torch.ones(1, pos + 1, dtype=torch.int64, device="cuda"),
             torch.full((1, 1), pos, device="cuda"))
        (l_ref, p_ref), (l_got, p_got) = gm(*a, p_ref), dec(*a, p_got)
        err = ((l_got.float() - l_ref.float()).norm() / l_ref.float().norm()).item()
        assert err < 2e-2, (i, err)
    assert dec.replays == 5


def test_bench_cuda_backends_run(tmp_path):
    from dsmoe import bench
    from dsmoe.bench_limits import Limits
    from dsmoe.bench_timing import ONCE

    lim = Limits(bandwidth_gbs=3000.0, gemm_gflops=7e5, bandwidth_bytes=0, gemm_n=0, device="cuda", gemm_dtype="bf16")
    r = bench.run_bench(suites=["moe-layer", "model"], backends=["eager", "fused", "grouped_mm", "cuda", "cuda-graph"],
                        quick=True, out_dir=tmp_path, progress=False, preset="small", method=ONCE, limits=lim,
                        device="cuda", tokens=[1, 33], overrides={"num_hidden_layers": 2})
    layer, model = r["suites"]["moe-layer"], r["suites"]["model"]
    for case in layer["cases"]:
        for name in ("eager", "fused", "cuda"):
            assert case["results"][name]["status"] == "ok", (case["case"], name, case["results"][name])
    for case in layer["cases"]:
        assert case["results"]["cuda-graph"]["status"] == "ok", case["results"]["cuda-graph"]
    for case in model["cases"]:
        for name in ("eager", "fused", "cuda", "cuda-graph"):
            assert case["results"][name]["status"] == "ok", (case["case"], name, case["results"][name])
    assert layer["machine"]["gpu"] and layer["dtype"] == "bf16" and len(layer["goals"]) == 5


def test_cuda_graphed_layer_replays_per_shape():
    from dsmoe.bench_backends import cached_fused_graph
    from dsmoe.bench_suites import moe_layer_workload
    from dsmoe.runtime import CudaGraphed

    w = moe_layer_workload("preset:small", {}, [1, 7], device="cuda", dtype=torch.bfloat16)
    gm, _ = cached_fused_graph(w)
    graphed = CudaGraphed(gm)
    for T in (1, 7, 1):
        x = torch.randn(T, w.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        ref, got = gm(x), graphed(x)
        assert got.data_ptr() != ref.data_ptr()
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 1e-2  # atomics may reorder sums
    assert len(graphed.graphs) == 2 and graphed.replays == 3
