"""Shared fixtures: the routing variants every numerical test sweeps (the one table), an
independent per-token router, and small models."""

from __future__ import annotations

import math
import os

import pytest
import torch

# Triton fixes its mode when first imported (torch.export imports it): without a GPU the kernel
# tests run it under the interpreter, so choose that before any test can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dsmoe

# Every DeepSeek routing variant, as config overrides of the tiny preset (8 experts, top-2).
# Tests that sweep routing take their variants from here (never a table of their own).
ROUTING_VARIANTS = {
    "v1-softmax-greedy": {},
    "v1-norm": {"norm_topk_prob": True},
    "v2-greedy-scaled": {"routed_scaling_factor": 2.0},
    "v2-group-limited": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                         "routed_scaling_factor": 16.0},
    "v2-group-limited-norm": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                              "norm_topk_prob": True, "routed_scaling_factor": 16.0},
    "v3-noaux-tc": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
                    "norm_topk_prob": True, "routed_scaling_factor": 2.5},
    "v3-noaux-tc-unnormalized": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 2,
                                 "topk_group": 1, "routed_scaling_factor": 2.5},
    "v3-noaux-tc-ungrouped": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1,
                              "routed_scaling_factor": 2.5},
}


def reference_route(logits: list[float], bias: list[float] | None, spec: dict) -> list[tuple[int, float]]:
    """One token's routing in plain Python, written from the spec (``spec-deepseek.md``) without
    torch: ``[(expert id, weight)]`` sorted by id. The independent reference for every router."""
    E = len(logits)
    if spec["scoring"] == "softmax":
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        scores = [math.exp(v - m) / z for v in logits]
    else:
        scores = [1 / (1 + math.exp(-v)) for v in logits]
    choice = [s + (bias[e] if bias is not None else 0.0) for e, s in enumerate(scores)]
    allowed = set(range(E))
    G = spec["n_group"]
    if spec["topk_method"] != "greedy" and G > 1:
        size = E // G
        groups = [choice[g * size:(g + 1) * size] for g in range(G)]
        if spec["topk_method"] == "noaux_tc":
            gscore = [sum(sorted(grp, reverse=True)[:2]) for grp in groups]
        else:
            gscore = [max(grp) for grp in groups]
        kept = sorted(range(G), key=lambda g: -gscore[g])[:spec["topk_group"]]
        allowed = {g * size + j for g in kept for j in range(size)}
    ids = sorted(allowed, key=lambda e: -choice[e])[:spec["top_k"]]
    w = [scores[e] for e in ids]
    if spec["norm_topk_prob"]:
        total = sum(w) + 1e-20
        w = [v / total for v in w]
    if spec["scale_when"] == "always" or not spec["norm_topk_prob"]:
        w = [v * spec["scaling"] for v in w]
    return sorted(zip(ids, w))


def tiny(variant: str = "v1-softmax-greedy", dtype: str = "float32", seed: int = 0, **extra):
    # router weights large enough that top-k is decisive (no near-ties between implementations)
    model = dsmoe.load("preset:tiny", overrides={**ROUTING_VARIANTS[variant], **extra}, dtype=dtype, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(10.0)
    return model


def run_cli(capsys, *argv, entry=None) -> tuple[int, str, str]:
    """``dsmoe ARGV`` in-process through the entry point (``dsmoe.app.cli.main``, or ``entry``):
    ``(exit code, stdout, stderr)``."""
    from dsmoe.app.cli import main

    capsys.readouterr()
    try:
        (entry or main)([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=list(ROUTING_VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="session")
def trt_plugins():
    """``(build, library)``: the TensorRT plugin library (built once, cached under build/) and the
    harness that drives it through the plugin ABI; ``DSMOE_TRT_PLUGINS=DIR`` takes a prebuilt one
    (``dsmoe build-plugins --out DIR``, for a GPU machine without nvcc). Skipped only where nvcc or
    the TensorRT headers are missing."""
    import json
    from pathlib import Path

    from dsmoe.plugins.trt import LIBRARY, HARNESS, PluginBuild, build_plugins, find_nvcc, find_tensorrt_include
    from dsmoe.plugins.trt.harness import PluginLibrary

    prebuilt = os.environ.get("DSMOE_TRT_PLUGINS")
    if prebuilt:
        d = Path(prebuilt)
        build = PluginBuild(d, d / LIBRARY, d / HARNESS, json.loads((d / "manifest.json").read_text()), True)
        return build, PluginLibrary(build.library, build.harness)
    if find_nvcc() is None or find_tensorrt_include() is None:
        pytest.skip("nvcc or the TensorRT headers are missing: the plugin library cannot be built here")
    build = build_plugins()
    return build, PluginLibrary(build.library, build.harness)
