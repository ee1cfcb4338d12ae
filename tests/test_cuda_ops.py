"""The Triton kernels of dsmoe::route and dsmoe::moe on a GPU against the CPU reference ops
(GPU only): the interpreter sweeps of test_triton_route.py / test_triton_moe.py, the
DeepSeekMoE-16B layer shapes, CUDA-graph capture, and the fused graph, decoder and bench backends
on the Triton kernels."""

from __future__ import annotations

import pytest
import torch
from test_triton_moe import MOE_CASES, check_moe, make_moe_inputs, moe_reference
from test_triton_route import ROUTE_CASES, check_route, make_route_inputs

import dsmoe.ops  # noqa: F401
from dsmoe import plugins

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    assert plugins.register_cuda_kernels() is True, plugins.cuda_kernels_status()


def _poison_cuda_cache(nbytes=256 << 20):
    """Fill memory the caching allocator will hand out next with NaN, so that an output element
    a kernel forgets to write shows up instead of reading as a stale plausible value."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def _route_on_cuda(x, w_gate, bias, top_k, attrs):
    _poison_cuda_cache()
    return torch.ops.dsmoe.route(x.cuda(), w_gate.cuda(), None if bias is None else bias.cuda(),
                                 top_k=top_k, **attrs)


@pytest.mark.parametrize("case", range(len(ROUTE_CASES)))
def test_route_matches_reference(case):
    T, H, E, K, attrs, xd, wd = ROUTE_CASES[case]
    x, w_gate, bias = make_route_inputs(T, H, E, attrs, xd, wd, seed=case)
    ref = torch.ops.dsmoe.route(x, w_gate, bias, top_k=K, **attrs)
    check_route(_route_on_cuda(x, w_gate, bias, K, attrs), ref, x, w_gate, bias, K, attrs)


@pytest.mark.parametrize("T", [1, 33, 4096])
def test_route_v3_full_size(T):
    attrs = dict(scoring="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
                 scaling=2.5, scale_when="always")
    x, w_gate, bias = make_route_inputs(T, 7168, 256, attrs, torch.bfloat16, torch.bfloat16, seed=T)
    ref = torch.ops.dsmoe.route(x, w_gate, bias, top_k=8, **attrs)
    check_route(_route_on_cuda(x, w_gate, bias, 8, attrs), ref, x, w_gate, bias, 8, attrs)


def _moe_on_cuda(x, weights, ids, w13, w2):
    cuda = [t.cuda() for t in (x, weights, ids, w13, w2)]
    _poison_cuda_cache()
    y = torch.ops.dsmoe.moe(*cuda, "silu")
    torch.cuda.synchronize()
    return y


@pytest.mark.parametrize("case", range(len(MOE_CASES)))
def test_moe_matches_reference(case):
    T, K, E, H, I, dtype, load = MOE_CASES[case]
    x, weights, ids, w13, w2 = make_moe_inputs(T, K, E, H, I, dtype, load, seed=case)
    check_moe(_moe_on_cuda(x, weights, ids, w13, w2), moe_reference(x, weights, ids, w13, w2), dtype)


@pytest.mark.parametrize("T", [1, 2, 4, 16, 64, 256, 1024, 4096])
def test_moe_deepseek_16b_layer(T):
    x, weights, ids, w13, w2 = make_moe_inputs(T, 6, 64, 2048, 1408, torch.bfloat16, "random", seed=T)
    check_moe(_moe_on_cuda(x, weights, ids, w13, w2), moe_reference(x, weights, ids, w13, w2), torch.bfloat16)


@pytest.mark.parametrize("load", ["one-expert", "even-experts"])
def test_moe_uneven_loads_at_prefill_size(load):
    x, weights, ids, w13, w2 = make_moe_inputs(8192, 6, 64, 256, 128, torch.bfloat16, load, seed=3)
    check_moe(_moe_on_cuda(x, weights, ids, w13, w2), moe_reference(x, weights, ids, w13, w2), torch.bfloat16)


def test_kernels_capture_in_a_cuda_graph():
    """No host sync and no per-call host state: route + moe replay correctly from a CUDA graph."""
    x, _, _, w13, w2 = (t.cuda() for t in make_moe_inputs(4, 6, 64, 256, 128, torch.bfloat16, "random", 1))
    w_gate = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16) * 0.25
    attrs = ("softmax", "greedy", 6, 1, 1, False, 1.0, "unnormalized")

    def step():
        w, i = torch.ops.dsmoe.route(x, w_gate, None, *attrs)
        return w, i, torch.ops.dsmoe.moe(x, w, i, w13, w2, "silu")

    step()  # compiles outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w, i, out = step()
    x.copy_(torch.randn_like(x))
    g.replay()
    route_attrs = dict(zip(("scoring", "topk_method", "top_k", "n_group", "topk_group", "norm_topk_prob",
                            "scaling", "scale_when"), attrs))
    ref = torch.ops.dsmoe.route(x.cpu(), w_gate.cpu(), None, **route_attrs)
    top_k = route_attrs.pop("top_k")
    check_route((w, i), ref, x, w_gate, None, top_k, route_attrs)
    check_moe(out, moe_reference(x.cpu(), w.cpu(), i.cpu(), w13.cpu(), w2.cpu()), torch.bfloat16)


def test_registered_ops_dispatch_to_cuda():
    for op in ("dsmoe::route", "dsmoe::moe"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    x, weights, ids, w13, w2 = (t.cuda() for t in make_moe_inputs(4, 2, 8, 64, 32, torch.bfloat16, "random", 5))
    y = torch.ops.dsmoe.moe(x, weights, ids, w13, w2, "silu")
    w, i = torch.ops.dsmoe.route(x, torch.randn(8, 64, device="cuda"), None, "softmax", "greedy", 2, 1, 1,
                                 False, 1.0, "unnormalized")
    assert y.is_cuda and w.is_cuda and i.is_cuda and i.dtype == torch.int32
    assert plugins.register_cuda_kernels() is True  # idempotent


def test_grouped_mm_baseline_on_cuda():
    x, weights, ids, w13, w2 = make_moe_inputs(64, 6, 16, 128, 64, torch.bfloat16, "random", 7)
    ref = torch.ops.dsmoe.moe(x, weights, ids, w13, w2, "silu").double()
    try:
        got = plugins.grouped_mm_moe(*(t.cuda() for t in (x, weights, ids, w13, w2)))
    except RuntimeError as e:
        pytest.skip(f"torch._grouped_mm unsupported here: {e}")
    assert ((got.double().cpu() - ref).norm() / ref.norm()) < 2e-2


# ---- the fused graph on CUDA: generation, CUDA-graph decode, the bench backends ---------------

def test_fused_generation_on_cuda_equals_eager_on_cpu():
    """fp32 (ieee tl.dot, fp32 routing): greedy tokens of the fused graph on the GPU, with and
    without CUDA-graph decode, equal the eager model's on the CPU."""
    import dsmoe
    from dsmoe.app.cuda_graphs import StaticDecoder, static_length
    from dsmoe.app.generate import eager_step, fused_step, greedy_generate

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
    from dsmoe.app.cuda_graphs import StaticDecoder
    from dsmoe.app.generate import empty_cache, fused_step

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
    from dsmoe.bench.limits import Limits
    from dsmoe.bench.timing import ONCE

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
    from dsmoe.bench.backends import cached_fused_graph
    from dsmoe.bench.suites import moe_layer_workload
    from dsmoe.app.cuda_graphs import CudaGraphed

    w = moe_layer_workload("preset:small", {}, [1, 7], device="cuda", dtype=torch.bfloat16)
    gm, _ = cached_fused_graph(w)
    graphed = CudaGraphed(gm)
    for T in (1, 7, 1):
        x = torch.randn(T, w.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        ref, got = gm(x), graphed(x)
        assert got.data_ptr() != ref.data_ptr()
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    assert len(graphed.graphs) == 2 and graphed.replays == 3
