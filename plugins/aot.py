"""Ahead-of-time build of every launch configuration: cubin + PTX + ``manifest.json``, no GPU needed.

:func:`build_kernels` compiles each kernel that :func:`~dsmoe.plugins.route.config.route_config`
and :func:`~dsmoe.plugins.moe.config.moe_config` can choose, for each architecture and dtype,
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (ptxas ships in the
triton wheel). The manifest is what a TensorRT plugin needs to launch them through the CUDA
driver API: entry name, ordered typed parameters (Triton appends two scratch pointers), constexprs
baked in, warps (block = 32·num_warps threads), dynamic shared memory, the grid as formulas of the
runtime sizes, the alignment the build assumed, and per op the selection rule, launch order and
workspace buffers. Run as ``python -m dsmoe.plugins.aot --arch sm_80,sm_90 --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from dsmoe.plugins import _triton
from dsmoe.plugins.moe import config as moe_cfg
from dsmoe.plugins.route import config as route_cfg
from dsmoe.children import run_child

ARCHS = ("sm_80", "sm_90")
ALIGN = 16  # bytes: every pointer, and H and I as element counts, are assumed divisible by 16
ALIGNED_SIZES = ("H", "I")
SCRATCH_PARAMS = ({"name": "global_scratch", "type": "*i8"}, {"name": "profile_scratch", "type": "*i8"})
ROUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAUNCH_NOTES = [
    "cuModuleLoadData(cubin); cuModuleGetFunction(entry)",
    "cuLaunchKernel(grid evaluated on T, H, E, K, I; block (threads_per_block, 1, 1); shared_bytes; params in order)",
    "scratch parameters: pass 0 (null) when their *_scratch_bytes are 0",
    "shared_bytes above 49152: cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) first",
    "sizes in formulas: T tokens, H hidden, E experts, K per token, I expert width; cdiv(a, b) = ceil(a / b)",
]


def parse_arch(arch: str) -> int:
    """``"sm_90"`` → 90 (ValueError for anything else)."""
    if not (arch.startswith("sm_") and arch[3:].isdigit() and int(arch[3:]) >= 80):
        raise ValueError(f"unsupported architecture {arch!r} (sm_80 or newer, e.g. sm_80, sm_90)")
    return int(arch[3:])


def build_kernels(archs=ARCHS, out_dir: str | Path = "kernels") -> dict:
    """Compile every launch configuration for ``archs`` into ``out_dir``; return the manifest.

    Triton's mode is fixed when it is imported, so a process running the interpreter builds in a
    child process (``python -m dsmoe.plugins.aot``) with ``TRITON_INTERPRET`` removed.
    """
    archs = [archs] if isinstance(archs, str) else list(archs)
    for a in archs:
        parse_arch(a)
    out = Path(out_dir)
    if _triton.interpreter_active():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = run_child([sys.executable, "-m", "dsmoe.plugins.aot", "--arch", ",".join(archs), "--out", str(out)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"kernel build failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads((out / "manifest.json").read_text())
    err = _triton.triton_error()
    if err:
        raise RuntimeError(err)
    import triton

    manifest = {"format": 1, "triton": triton.__version__, "launch": LAUNCH_NOTES, "kernels": {}, "ops": {}}
    for arch in archs:
        cc = parse_arch(arch)
        (out / arch).mkdir(parents=True, exist_ok=True)
        for op, configs in (("route", _route_plans(cc)), ("moe", _moe_plans(cc))):
            rules = manifest["ops"].setdefault(op, _op_info(op))
            for cfg, dtype, when in configs:
                ids = [_compile(manifest["kernels"], op, launch, dtype, arch, cc, out) for launch in cfg.launches]
                entry = {"arch": arch, "dtype": _triton.TYPE_OF_DTYPE[dtype], "path": cfg.path, "when": when,
                         "launches": ids}
                entry["buffers"] = [{"name": b.name, "type": b.type.replace("{x}", entry["dtype"]),
                                     "numel": b.numel, "zeroed": b.zeroed} for b in cfg.buffers]
                if op == "moe":
                    entry["sizes"] = {"P": "T*K", "MB": cfg.mb}
                rules["configs"].append(entry)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _route_plans(cc: int):
    for cfg in route_cfg.all_route_configs(cc):
        for dtype in ROUTE_DTYPES:
            yield cfg, dtype, route_cfg.route_rule(cfg)


def _moe_plans(cc: int):
    for cfg, dtypes in moe_cfg.all_moe_configs(cc):
        for dtype in dtypes:
            yield cfg, dtype, moe_cfg.moe_rule(cfg)


def _op_info(op: str) -> dict:
    if op == "route":
        return {"configs": [], "codes": {"scoring": route_cfg.SCORINGS, "method": route_cfg.TOPK_METHODS},
                "notes": ["x and w_gate in one dtype (the op upcasts both to fp32 when they differ)",
                          "bias: fp32 [E], zeros when the op has none",
                          "scale = 1 if scale_when == 'always' or not normalize",
                          "method 0 (greedy) also when n_group == 1; then n_group = topk_group = 1"]}
    return {"configs": [], "notes": ["zero the buffers marked zeroed, then launch in order",
                                     "ids int32, weights fp32 [T,K]; y in x's dtype"]}


def _compile(kernels: dict, op: str, launch: _triton.Launch, dtype: torch.dtype, arch: str, cc: int,
             out: Path) -> str:
    """Compile one launch (once per distinct signature) and record it; return its manifest id."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = _kernel_params(op, launch.kernel)
    constexprs = dict(launch.constexprs, **({"F32_DOT": dtype == torch.float32} if "F32_DOT" in params else {}))
    runtime = kernel_param_names(launch)
    if params != runtime + list(constexprs):
        raise RuntimeError(f"{launch.kernel}: kernel parameters {params} != launch arguments {runtime} + constexprs")
    signature = {**dict(zip(runtime, launch.types(dtype))), **{c: "constexpr" for c in constexprs}}
    key = json.dumps([launch.kernel, signature, constexprs, launch.num_warps, launch.num_stages, arch])
    kid = f"{launch.kernel}-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if kid in kernels:
        return kid
    aligned = [i for i, p in enumerate(params) if signature[p].startswith("*") or p in ALIGNED_SIZES]
    assert all(signature[p] != "constexpr" for p in (params[i] for i in aligned))
    src = ASTSource(getattr(_triton.kernels(op), launch.kernel), signature, constexprs,
                    {(i,): [["tt.divisibility", ALIGN]] for i in aligned})
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages,
                                 "enable_fp_fusion": True})
    (out / arch / f"{kid}.cubin").write_bytes(ck.asm["cubin"])
    (out / arch / f"{kid}.ptx").write_text(ck.asm["ptx"])
    md = ck.metadata
    kernels[kid] = {
        "op": op, "kernel": launch.kernel, "entry": md.name, "arch": arch,
        "cubin": f"{arch}/{kid}.cubin", "ptx": f"{arch}/{kid}.ptx",
        "params": [{"name": n, "type": signature[p]} for (n, _), p in zip(launch.args, runtime)]
        + [dict(s) for s in SCRATCH_PARAMS],
        "constexprs": constexprs, "num_warps": md.num_warps, "num_stages": launch.num_stages,
        "threads_per_block": 32 * md.num_warps, "shared_bytes": md.shared, "grid": list(launch.grid),
        "global_scratch_bytes": md.global_scratch_size, "profile_scratch_bytes": md.profile_scratch_size,
        "requires": {"pointer_alignment_bytes": ALIGN,
                     **{p: ALIGN for p in params if p in ALIGNED_SIZES}},
    }
    return kid


def kernel_param_names(launch: _triton.Launch) -> list[str]:
    """The kernel's runtime parameter names for a launch's arguments (pointers end in ``_ptr``)."""
    return [f"{n}_ptr" if t.startswith("*") else n for n, t in launch.args]


def _kernel_params(op: str, kernel: str) -> list[str]:
    return list(getattr(_triton.kernels(op), kernel).arg_names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsmoe.plugins.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(ARCHS), help="comma-separated, e.g. sm_80,sm_90")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    m = build_kernels([a.strip() for a in args.arch.split(",") if a.strip()], args.out)
    print(f"{len(m['kernels'])} kernels -> {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
