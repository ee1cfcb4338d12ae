"""CPU-side tests of plugins/: every .cu compiles to PTX (sm_80, sm_90) with nvcc, attribute
validation of the launchers, the build cache key, the torch._grouped_mm baseline, and
register_cuda_kernels() without CUDA."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import dsmoe.ops  # noqa: F401
from dsmoe import plugins
from dsmoe.plugins import build
from dsmoe.plugins.moe.launch import TILES, plan_moe
from dsmoe.plugins.route.launch import validate_route_attrs

CU_FILES = sorted(build.PLUGIN_DIR.rglob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = build.find_nvcc()

# The kernel names each launcher asks for; the PTX must define every one of them.
EXPECTED_ENTRIES = {
    "route.cu": [f"route_{x}_{w}_t{t}" for x, w in [("f32", "f32"), ("bf16", "bf16"), ("bf16", "f32"),
                                                     ("f16", "f16"), ("f16", "f32")] for t in (1, 8)],
    "moe.cu": ["moe_align"]
    + [f"moe_gemm1_{d}_{c}" for d in ("bf16", "f16") for c in ("dec", "pre")]
    + [f"moe_gemm2_{d}_{c}_{m}" for d in ("bf16", "f16") for c in ("dec", "pre") for m in ("reduce", "atomic")]
    + [f"moe_simt_gemm1_{d}" for d in ("f32", "bf16", "f16")]
    + [f"moe_simt_gemm2_{d}_{m}" for d in ("f32", "bf16", "f16") for m in ("reduce", "atomic")]
    + [f"moe_{k}_{d}" for k in ("combine", "cast") for d in ("f32", "bf16", "f16")],
}


def test_every_kernel_source_is_listed():
    assert {p.name for p in CU_FILES} == set(EXPECTED_ENTRIES)


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[tuple[str, str], str]:
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda): CUDA sources not compiled")
    out_dir = tmp_path_factory.mktemp("ptx")

    def one(job):
        src, arch = job
        out = out_dir / f"{src.stem}-{arch}.ptx"
        build.compile_nvcc(NVCC, src, arch, out, fmt="ptx")
        return (src.name, arch), out.read_text()

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, [(src, arch) for src in CU_FILES for arch in ARCHS]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [p.name for p in CU_FILES])
def test_cu_compiles_to_ptx_with_all_entries(ptx, src, arch):
    text = ptx[(src, arch)]
    for name in EXPECTED_ENTRIES[src]:
        assert f".entry {name}(" in text, f"{src} ({arch}) lacks kernel {name}"


def _ptx_params(text: str, entry: str) -> list[str]:
    """The PTX parameter types of ``entry`` (``u64``, ``u32``, ``f32``...)."""
    m = re.search(rf"\.entry {entry}\((.*?)\)", text, re.S)
    assert m, entry
    return re.findall(r"\.param \.(\w+)", m.group(1))


PTX_TYPE = {"p": "u64", "i": "u32", "q": "u64", "f": "f32"}


def test_launcher_signatures_match_ptx(ptx):
    from dsmoe.plugins.moe import launch as moe_launch
    from dsmoe.plugins.route import launch as route_launch

    sigs = {("route.cu", e): route_launch.ROUTE_SIG for e in EXPECTED_ENTRIES["route.cu"]}
    for e in EXPECTED_ENTRIES["moe.cu"]:
        sig = (moe_launch.ALIGN_SIG if e == "moe_align" else moe_launch.COMBINE_SIG if "combine" in e
               else moe_launch.CAST_SIG if "cast" in e else moe_launch.GEMM_SIG)
        sigs[("moe.cu", e)] = sig
    for (src, entry), sig in sigs.items():
        got = _ptx_params(ptx[(src, "sm_90")], entry)
        assert got == [PTX_TYPE[c] for c in sig], f"{entry}: PTX params {got} vs launcher {sig!r}"


def test_tensor_core_kernels_use_mma(ptx):
    text = ptx[("moe.cu", "sm_90")]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in text
    assert "ldmatrix.sync.aligned" in text and "cp.async" in text


# ---------------------------------------------------------------- build cache key


def test_cache_key_is_stable_and_sensitive():
    k = build.cache_key("src", {"h.cuh": "a"}, "sm_90", "nvrtc13")
    assert k == build.cache_key("src", {"h.cuh": "a"}, "sm_90", "nvrtc13")
    others = {build.cache_key("src2", {"h.cuh": "a"}, "sm_90", "nvrtc13"),
              build.cache_key("src", {"h.cuh": "b"}, "sm_90", "nvrtc13"),
              build.cache_key("src", {"h.cuh": "a"}, "sm_80", "nvrtc13"),
              build.cache_key("src", {"h.cuh": "a"}, "sm_90", "nvrtc12")}
    assert k not in others and len(others) == 4


def test_cache_path_per_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("DSMOE_KERNEL_CACHE", str(tmp_path))
    p = build.cache_path("moe", "sm_90", "abc")
    assert p.parent == tmp_path and "sm_90" in p.name and p.suffix == ".cubin"


def test_nvcc_build_caches_cubin(monkeypatch, tmp_path):
    if NVCC is None:
        pytest.skip("nvcc not found")
    monkeypatch.setenv("DSMOE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_nvrtc", lambda: None)
    tiny = tmp_path / "tiny" / "tiny.cu"  # the cache logic, not the kernels: keep the compile short
    tiny.parent.mkdir()
    tiny.write_text('#include "dsmoe_common.cuh"\nextern "C" __global__ void k(float* y) { y[0] = dsmoe::silu(y[0]); }\n')
    monkeypatch.setattr(build, "source_path", lambda name: tiny)
    first = build.build("tiny", "sm_90")
    mtime = first.stat().st_mtime_ns
    assert first.is_file() and first.parent == tmp_path
    assert build.build("tiny", "sm_90") == first and first.stat().st_mtime_ns == mtime
    tiny.write_text(tiny.read_text() + "// changed\n")
    assert build.build("tiny", "sm_90") != first  # a source change is a new cache entry


def test_launch_signature_mismatch_is_an_error():
    mod = object.__new__(build.Module)
    with pytest.raises(ValueError, match="signature"):
        build.Module.launch(mod, "k", (1,), (1,), "pi", (None,))


# ---------------------------------------------------------------- route attributes

V3 = dict(scoring="sigmoid", topk_method="noaux_tc", top_k=8, n_group=8, topk_group=4,
          norm_topk_prob=True, scaling=2.5, scale_when="always")
V1 = dict(scoring="softmax", topk_method="greedy", top_k=6, n_group=1, topk_group=1,
          norm_topk_prob=False, scaling=1.0, scale_when="unnormalized")


def test_route_splits_experts_for_small_T():
    one = validate_route_attrs(1, 2048, 64, **V1).with_splits(132)
    assert one.splits == 8 and one.grid == (1, 8, 1)       # one expert per warp
    v3 = validate_route_attrs(4, 7168, 256, **V3).with_splits(132)
    assert v3.splits == 32 and v3.grid == (4, 32, 1)
    big = validate_route_attrs(8192, 2048, 64, **V1)
    assert big.with_splits(132).splits == 1                # 1024 token blocks fill the GPU
    assert validate_route_attrs(1, 64, 6, **{**V1, "top_k": 2}).with_splits(132).splits == 1


def test_route_attrs_ok():
    p = validate_route_attrs(4, 7168, 256, **V3)
    assert (p.K, p.n_group, p.topk_group, p.method, p.scoring) == (8, 8, 4, 2, 1)
    assert p.normalize and p.scale_always and p.tokens_per_cta == 1
    big = validate_route_attrs(4096, 2048, 64, **V1)
    assert big.tokens_per_cta == 8 and big.grid == (512, 1, 1) and big.smem_bytes <= 48 * 1024
    assert validate_route_attrs(3, 16, 64, **{**V1, "n_group": 8}).n_group == 1  # greedy ignores groups


@pytest.mark.parametrize("change, match", [
    ({"scoring": "tanh"}, "scoring"),
    ({"topk_method": "gready"}, "topk_method"),
    ({"scale_when": "never"}, "scale_when"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 33}, "top_k"),
    ({"n_group": 7}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
])
def test_route_attrs_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        validate_route_attrs(2, 64, 256, **{**V3, **change})


def test_route_rejects_top_k_beyond_kept_groups():
    with pytest.raises(ValueError, match="kept groups"):
        validate_route_attrs(2, 64, 64, **{**V3, "topk_group": 1, "top_k": 9})


def test_route_rejects_huge_E():
    with pytest.raises(ValueError, match="too large"):
        validate_route_attrs(1, 8, 1 << 14, **V1)


# ---------------------------------------------------------------- moe plan


def _plan(T, K=6, E=64, H=2048, I=1408, dtype=torch.bfloat16, **kw):
    return plan_moe((T, H), (T, K), (E, 2 * I, H), (E, H, I), dtype, **kw)


def test_moe_plan_paths():
    assert _plan(1).path == "dec" and _plan(16384).path == "pre"
    assert _plan(16, dtype=torch.float32).path == "simt"
    assert _plan(16, H=2050).path == "simt" and _plan(16, I=1404).path == "simt"
    with pytest.raises(ValueError, match="needs bf16"):
        _plan(16, dtype=torch.float32, path="pre")


@pytest.mark.parametrize("T, K, E", [(1, 1, 1), (1, 6, 64), (5, 8, 3), (1000, 6, 64), (16384, 8, 256), (7, 2, 97)])
@pytest.mark.parametrize("path", ["dec", "pre", "simt"])
def test_moe_plan_max_blocks_bounds_every_assignment(T, K, E, path):
    plan = _plan(T, K=K, E=E, path=path)
    BM = TILES[path][0]
    # worst cases for padding: pairs spread one per expert, or all on one expert
    spread = [T * K // E + (e < T * K % E) for e in range(E)]
    for counts in (spread, [T * K] + [0] * (E - 1)):
        assert sum(-(-c // BM) for c in counts) <= plan.max_blocks


def test_moe_workspace_layout():
    plan = _plan(3, K=2, E=5, H=64, I=32)
    ws = plan.workspace()
    offsets = [ws[n][0] for n in ("offsets", "block_expert", "sorted_pair", "act", "out")]
    assert offsets == sorted(offsets) and all(o % 256 == 0 for o in offsets)
    assert ws["out"][1] == 3 * 2 * 64 and plan.workspace_bytes >= ws["out"][0] + 3 * 2 * 64 * 4
    atomic = _plan(3, K=2, E=5, H=64, I=32, combine="atomic").workspace()
    assert "out" not in atomic and atomic["y32"][1] == 3 * 64
    assert "y32" not in _plan(3, H=64, I=32, dtype=torch.float32, combine="atomic").workspace()
    assert _plan(16384, H=7168).combine == "atomic"  # the fp32 per-pair buffer would exceed 1 GiB


@pytest.mark.parametrize("kw, match", [
    ({"activation": "gelu"}, "activation"),
    ({"dtype": torch.float64}, "dtype"),
    ({"combine": "sum"}, "combine"),
])
def test_moe_plan_rejects(kw, match):
    dtype = kw.pop("dtype", torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        plan_moe((2, 64), (2, 2), (4, 64, 64), (4, 64, 32), dtype, **kw)


def test_moe_plan_rejects_bad_shapes():
    with pytest.raises(ValueError, match="inconsistent"):
        plan_moe((2, 64), (2, 2), (4, 64, 64), (4, 64, 16), torch.bfloat16)


# ---------------------------------------------------------------- grouped_mm baseline, registration


@pytest.mark.skipif(not plugins.grouped_mm_available(), reason="torch has no torch._grouped_mm")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("T, K, E", [(1, 1, 4), (9, 3, 5), (33, 6, 16)])
def test_grouped_mm_moe_matches_reference_on_cpu(T, K, E, dtype, tol):
    g = torch.Generator().manual_seed(T * 100 + K * 10 + E)
    H, I = 32, 16
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K, generator=g)
    try:
        got = plugins.grouped_mm_moe(x, w, ids, w13, w2)
    except RuntimeError as e:  # a torch whose _grouped_mm has no CPU kernel for this dtype
        pytest.skip(f"torch._grouped_mm on CPU: {e}")
    ref = torch.ops.dsmoe.moe(x, w, ids, w13, w2, "silu")
    assert got.dtype == dtype and got.shape == (T, H)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < tol


def test_grouped_mm_moe_all_tokens_on_one_expert():
    if not plugins.grouped_mm_available():
        pytest.skip("torch has no torch._grouped_mm")
    x = torch.randn(5, 16)
    w13, w2 = torch.randn(3, 16, 16), torch.randn(3, 16, 8)
    ids = torch.full((5, 1), 2, dtype=torch.int32)
    w = torch.rand(5, 1)
    torch.testing.assert_close(plugins.grouped_mm_moe(x, w, ids, w13, w2),
                               torch.ops.dsmoe.moe(x, w, ids, w13, w2, "silu"), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_register_cuda_kernels_without_cuda():
    assert plugins.register_cuda_kernels() is False
    assert plugins.register_cuda_kernels() is False  # idempotent
    ok, reason = plugins.cuda_kernels_status()
    assert ok is False and "cuda" in reason.lower()


def test_plugins_import_needs_no_cuda_python():
    code = ("import sys, torch, dsmoe.ops; before = set(sys.modules);"
            "import dsmoe.plugins, dsmoe.plugins.build, dsmoe.plugins.route.launch, dsmoe.plugins.moe.launch;"
            "new = {m.split('.')[0] for m in set(sys.modules) - before};"
            "assert not new & {'cuda', 'cupy'}, new")
    subprocess.run([__import__("sys").executable, "-c", code], check=True)


def test_readmes_have_the_sections():
    for folder in ("route", "moe"):
        text = (Path(build.PLUGIN_DIR) / folder / "README.md").read_text()
        heads = [line for line in text.splitlines() if line.startswith("## ")]
        assert heads == ["## Description", "## Inputs/outputs", "## Parameters", "## Known issues"], folder
