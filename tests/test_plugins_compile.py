"""CPU-side tests of plugins/ that need neither a GPU nor the interpreter: the config functions
(paths, tiles, the row-block bound, the manifest's selection rules), attribute validation, the
torch._grouped_mm baseline, register_cuda_kernels() without CUDA, imports and the READMEs."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsmoe.ops  # noqa: F401
from dsmoe import plugins
from dsmoe.plugins import _triton
from dsmoe.plugins.moe.config import MB, all_moe_configs, moe_config, moe_rule
from dsmoe.plugins.route.config import all_route_configs, route_config, route_rule, validate_route

PLUGIN_DIR = Path(plugins.__file__).parent

# ---------------------------------------------------------------- route attributes and config

V3 = dict(scoring="sigmoid", topk_method="noaux_tc", top_k=8, n_group=8, topk_group=4,
          norm_topk_prob=True, scaling=2.5, scale_when="always")
V1 = dict(scoring="softmax", topk_method="greedy", top_k=6, n_group=1, topk_group=1,
          norm_topk_prob=False, scaling=1.0, scale_when="unnormalized")


def test_route_attrs_ok():
    a = validate_route(4, 7168, 256, **V3)
    assert (a.K, a.n_group, a.topk_group, a.method, a.scoring) == (8, 8, 4, 2, 1)
    assert a.normalize == 1 and a.scale == 1 and a.scaling == 2.5
    v1 = validate_route(4, 2048, 64, **V1)
    assert v1.normalize == 0 and v1.scale == 1  # V1/V2 scale when they do not normalize
    assert validate_route(4, 2048, 64, **{**V1, "norm_topk_prob": True}).scale == 0
    assert validate_route(3, 16, 64, **{**V1, "n_group": 8}).n_group == 1  # greedy ignores groups


@pytest.mark.parametrize("change, match", [
    ({"scoring": "tanh"}, "scoring"),
    ({"topk_method": "gready"}, "topk_method"),
    ({"scale_when": "never"}, "scale_when"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 9}, "top_k"),
    ({"n_group": 7}, "n_group"),
    ({"n_group": 16}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
])
def test_route_attrs_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        validate_route(2, 64, 256, **{**V3, **change})


def test_route_rejects_top_k_beyond_kept_groups_and_huge_E():
    with pytest.raises(ValueError, match="kept groups"):
        validate_route(2, 64, 32, **{**V3, "topk_group": 1})  # 1 group of 4 experts for top_k=8
    with pytest.raises(ValueError, match="E <= 256"):
        validate_route(1, 8, 257, **V1)


def test_route_config_paths():
    small, large = route_config(16, 64, 6, 2048, torch.bfloat16, 90), route_config(17, 256, 8, 7168, torch.bfloat16, 90)
    assert small.path == "small" and large.path == "large"
    assert small.logits.grid_of(T=1, E=256) == (1, 16, 1)  # decode: W_gate spread over the expert blocks
    assert large.logits.grid_of(T=4096, E=256) == (64, 4, 1)
    assert dict(small.select.constexprs)["E_PAD"] == 64 and dict(large.select.constexprs)["E_PAD"] == 256
    with pytest.raises(ValueError, match="dtype"):
        route_config(1, 8, 1, 8, torch.float64, 90)


# ---------------------------------------------------------------- moe config

def test_moe_config_paths_and_tiles():
    dec = moe_config(1, 64, 6, 2048, 1408, torch.bfloat16, 90)
    assert dec.path == "small" and dec.BLOCK_M == 16
    # 16B decode: 6 row blocks x I/32 (gate/up) and H/32 (down) tiles: >= 2 CTAs per SM of an H200
    assert dec.gate_up.grid_of(T=1, K=6, E=64, I=1408) == (6, 44, 1)
    assert dec.down.grid_of(T=1, K=6, E=64, H=2048) == (6, 64, 1)
    pre = moe_config(4096, 64, 6, 2048, 1408, torch.bfloat16, 90)
    assert pre.path == "large" and pre.BLOCK_M == 64 and pre.gate_up.num_warps == 4
    assert moe_config(170, 64, 6, 1, 1, torch.bfloat16, 90).path == "small"   # 1020 <= 16*64
    assert moe_config(171, 64, 6, 1, 1, torch.bfloat16, 90).path == "large"
    f32 = moe_config(1, 64, 6, 1, 1, torch.float32, 90)
    assert dict(f32.gate_up.constexprs)["BLOCK_K"] != dict(dec.gate_up.constexprs)["BLOCK_K"]
    with pytest.raises(ValueError, match="dtype"):
        moe_config(1, 8, 1, 8, 8, torch.float64, 90)


@pytest.mark.parametrize("T, K, E", [(1, 1, 1), (1, 6, 64), (5, 8, 3), (1000, 6, 64), (16384, 8, 256), (7, 2, 97)])
@pytest.mark.parametrize("bm", [16, 64])
def test_moe_row_block_bound_holds_for_every_assignment(T, K, E, bm):
    mb = _triton.evaluate(MB.format(bm=bm), T=T, K=K, E=E)
    spread = [T * K // E + (e < T * K % E) for e in range(E)]  # worst cases for padding
    for counts in (spread, [T * K] + [0] * (E - 1)):
        assert sum(-(-c // bm) for c in counts) <= mb


def test_manifest_rules_pick_what_the_config_functions_pick():
    sizes = itertools.product((1, 2, 16, 17, 170, 171, 4096), (1, 6, 8), (8, 64, 65, 256), (32, 2048))
    for arch in (80, 90):
        routes = all_route_configs(arch)
        moes = all_moe_configs(arch)
        for T, K, E, H in sizes:
            env = dict(T=T, K=K, E=E, H=H, I=H)
            hits = [c for c in routes if _triton.evaluate(route_rule(c), **env)]
            assert hits == [route_config(T, E, K, H, torch.bfloat16, arch)]
            for dt in (torch.bfloat16, torch.float32):
                hits = [c for c, dts in moes if dt in dts and _triton.evaluate(moe_rule(c), **env)]
                assert hits == [moe_config(T, E, K, H, H, dt, arch)]


def test_launch_grid_and_types():
    cfg = moe_config(3, 8, 2, 64, 32, torch.bfloat16, 90)
    assert cfg.gate_up.types(torch.bfloat16)[:2] == ["*bf16", "*bf16"]
    assert cfg.down.types(torch.float16)[6:8] == ["*fp32", "*fp32"]
    assert cfg.combine.grid_of(T=9, H=300) == (2, 2, 1)
    assert _triton.evaluate(cfg.mb, T=3, K=2, E=8) == (6 + 6 * 15) // 16


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


def test_plugins_import_needs_no_cuda_python_nor_triton():
    code = ("import sys, torch, dsmoe.ops; before = set(sys.modules);"
            "import dsmoe.plugins, dsmoe.plugins.aot, dsmoe.plugins.route.launch, dsmoe.plugins.moe.launch;"
            "new = {m.split('.')[0] for m in set(sys.modules) - before};"
            "assert not new & {'cuda', 'cupy', 'triton'}, new")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_use_triton_kernels_modes():
    with pytest.raises(ValueError, match="kernel mode"), plugins.use_triton_kernels("cuda"):
        pass
    with plugins.use_triton_kernels("reference"):  # a pass-through flag value
        assert plugins.cpu_kernels() == "reference"


def test_interpreter_cannot_follow_a_compiled_triton_import():
    code = ("import torch._dynamo, dsmoe.plugins as p\n"  # torch._dynamo imports triton (compiled mode)
            "try:\n    p.use_triton_kernels('interpret').__enter__()\n"
            "except RuntimeError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "refused: the Triton interpreter must be chosen before triton is imported" in out.stdout


def test_readmes_have_the_sections():
    for folder in ("route", "moe"):
        text = (PLUGIN_DIR / folder / "README.md").read_text()
        heads = [line for line in text.splitlines() if line.startswith("## ")]
        assert heads == ["## Description", "## Inputs/outputs", "## Parameters", "## Launch configuration",
                         "## Known issues"], folder
