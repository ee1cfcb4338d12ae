"""Ahead-of-time build (no GPU): every launch configuration compiles for sm_80 and sm_90, the
manifest is enough to launch each cubin, and Hopper's tensor-core configurations use wgmma."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dsmoe.plugins import _triton
from dsmoe.plugins.aot import ARCHS, ROUTE_DTYPES, build_kernels, parse_arch
from dsmoe.plugins.moe.config import all_moe_configs
from dsmoe.plugins.route.config import all_route_configs

PTX_TYPE = {"i32": "u32", "fp32": "f32"}  # pointers: u64
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # opt-in dynamic shared memory per block


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if _triton.triton_error():
        pytest.skip(_triton.triton_error())
    out = tmp_path_factory.mktemp("kernels")
    manifest = build_kernels(ARCHS, out)  # a child process when this one runs the interpreter
    assert json.loads((out / "manifest.json").read_text()) == manifest
    return out, manifest


def _ptx(out, k) -> str:
    return (out / k["ptx"]).read_text()


def _entry_params(ptx: str, entry: str) -> list[str]:
    m = re.search(rf"\.entry {entry}\((.*?)\)", ptx, re.S)
    assert m, entry
    return re.findall(r"\.param \.(\w+)", m.group(1))


def test_every_configuration_is_built_for_every_arch_and_dtype(built):
    out, m = built
    for arch in ARCHS:
        cc = parse_arch(arch)
        route = [c for c in m["ops"]["route"]["configs"] if c["arch"] == arch]
        assert len(route) == len(all_route_configs(cc)) * len(ROUTE_DTYPES)
        moe = [c for c in m["ops"]["moe"]["configs"] if c["arch"] == arch]
        assert len(moe) == sum(len(dts) for _, dts in all_moe_configs(cc))
        for entry in route + moe:
            assert len(entry["launches"]) == (2 if entry in route else 6)
            for kid in entry["launches"]:
                k = m["kernels"][kid]
                assert k["arch"] == arch
                assert (out / k["cubin"]).read_bytes()[:4] == b"\x7fELF"
                assert f".target sm_{cc}" in _ptx(out, k)


def test_manifest_signatures_match_the_ptx(built):
    out, m = built
    for kid, k in m["kernels"].items():
        got = _entry_params(_ptx(out, k), k["entry"])
        want = ["u64" if p["type"].startswith("*") else PTX_TYPE[p["type"]] for p in k["params"]]
        assert got == want, kid
        assert [p["name"] for p in k["params"][-2:]] == ["global_scratch", "profile_scratch"]
        assert k["global_scratch_bytes"] == 0 and k["profile_scratch_bytes"] == 0  # pass null pointers
        assert k["threads_per_block"] == 32 * k["num_warps"]
        assert 0 <= k["shared_bytes"] <= SMEM_LIMIT[k["arch"]], kid
        assert len(k["grid"]) == 3 and k["requires"]["pointer_alignment_bytes"] == 16


def test_manifest_rules_and_formulas_are_enough_to_launch(built):
    """What a plugin does with the manifest alone: pick the config, size the grid and buffers."""
    _, m = built
    sizes = dict(T=129, H=2048, E=64, K=6, I=1408)
    for op in ("route", "moe"):
        for arch in ARCHS:
            for dt in ("fp32", "bf16", "fp16"):
                hits = [c for c in m["ops"][op]["configs"] if c["arch"] == arch and c["dtype"] == dt
                        and _triton.evaluate(c["when"], **sizes)]
                assert len(hits) == 1, (op, arch, dt)
                for kid in hits[0]["launches"]:
                    grid = [_triton.evaluate(f, **sizes) for f in m["kernels"][kid]["grid"]]
                    assert all(g >= 1 for g in grid)
                    types = [p["type"] for p in m["kernels"][kid]["params"]]
                    assert f"*{dt}" in types or all(t in ("*i32", "*fp32", "*i8", "i32", "fp32") for t in types)
                for b in hits[0].get("buffers", []):
                    assert _triton.evaluate(b["numel"], **sizes) >= 1
    codes = m["ops"]["route"]["codes"]
    assert codes["scoring"] == {"softmax": 0, "sigmoid": 1} and codes["method"]["noaux_tc"] == 2


def _tensor_core_kernels(m, arch):
    """(kernel record, dtype, path) of every GEMM kernel of ``arch``."""
    for op in ("route", "moe"):
        for c in m["ops"][op]["configs"]:
            if c["arch"] != arch:
                continue
            for kid in c["launches"]:
                k = m["kernels"][kid]
                if "F32_DOT" in k["constexprs"]:
                    yield k, c["dtype"], c["path"]


def test_hopper_tensor_core_configurations_use_wgmma(built):
    out, m = built
    seen = set()
    for k, dt, path in _tensor_core_kernels(m, "sm_90"):
        ptx = _ptx(out, k)
        assert k["constexprs"]["F32_DOT"] == (dt == "fp32")
        if dt == "fp32":
            assert "mma" not in ptx, k["kernel"]  # ieee fp32: FMA, no tensor cores
        elif path == "large":
            assert "wgmma.mma_async" in ptx, f"{k['kernel']} {dt} ({path}) has no wgmma"
            seen.add(k["kernel"])
        else:  # 16-row blocks: below wgmma's 64-row tile, mma.sync (bandwidth-bound anyway)
            assert "mma.sync" in ptx and "wgmma" not in ptx, k["kernel"]
    assert seen == {"route_logits_kernel", "moe_gate_up_kernel", "moe_down_kernel"}


def test_ampere_configurations_use_mma_sync(built):
    out, m = built
    for k, dt, _ in _tensor_core_kernels(m, "sm_80"):
        ptx = _ptx(out, k)
        assert "wgmma" not in ptx
        assert ("mma.sync" in ptx) == (dt != "fp32"), k["kernel"]


def test_build_kernels_rejects_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="architecture"):
        build_kernels(["sm_75"], tmp_path)
    with pytest.raises(ValueError, match="architecture"):
        build_kernels(["hopper"], tmp_path)


def test_route_dtypes_are_the_launcher_dtypes():
    assert set(ROUTE_DTYPES) == set(_triton.TYPE_OF_DTYPE) == {torch.float32, torch.bfloat16, torch.float16}


SPECIALIZED_ONES = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsmoe.plugins import _triton
from dsmoe.plugins.aot import kernel_param_names
from dsmoe.plugins.moe.config import moe_config
from dsmoe.plugins.route.config import route_config
for op, cfg in (("route", route_config(1, 64, 1, 64, torch.bfloat16, 90)),
                ("moe", moe_config(1, 64, 1, 64, 64, torch.bfloat16, 90))):
    for launch in cfg.launches:
        fn = getattr(_triton.kernels(op), launch.kernel)
        sig = dict(zip(kernel_param_names(launch), launch.types(torch.bfloat16)))
        cx = dict(launch.constexprs, **({"F32_DOT": False} if "F32_DOT" in fn.arg_names else {}))
        cx.update({n: 1 for n, t in sig.items() if t == "i32"})  # as the JIT does with ints equal to 1
        sig = {p: "constexpr" if p in cx else sig[p] for p in fn.arg_names}
        triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": launch.num_warps, "enable_fp_fusion": True})
        print(launch.kernel)
"""


def test_kernels_compile_with_sizes_specialized_to_one():
    """The GPU's JIT turns int arguments equal to 1 (T, K, n_group...) into constexprs: the kernels
    must compile that way too (neither the interpreter nor the AOT build does it)."""
    if _triton.triton_error():
        pytest.skip(_triton.triton_error())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SPECIALIZED_ONES], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.split()) == 8
