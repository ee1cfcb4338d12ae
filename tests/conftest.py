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


@pytest.fixture
def run(capsys):
    """``dsmoe ARGV`` in-process (:func:`run_cli`): ``(exit code, stdout, stderr)``."""
    return lambda *argv: run_cli(capsys, *argv)


def one_line(code, err, want_code, *needles, error_prefix: bool = False):
    """Exit ``want_code`` and exactly one line on stderr (besides export's ``· stage`` progress),
    holding every needle (and starting ``error: `` with ``error_prefix``)."""
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("· ")]
    assert code == want_code, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not error_prefix or lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(params=list(ROUTING_VARIANTS))
def variant(request):
    return request.param


# ---- DeepSeek-V2/V3 checkpoints saved by transformers (the MLA peer) ----------------------------
# Tiny random configs for transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM, one per
# feature the MLA loader must get right: q_lora null (V2-Lite's q_proj) or set, YaRN (with and
# without the softmax-scale / cos-sin mscale corrections), interleaved or rotate-half RoPE, and the
# V2/V3 routings. transformers' V2 router never renormalizes (it always scales), so V2 peers keep
# norm_topk_prob false (see spec-deepseek.md §3b). YaRN peers use original_max_position_embeddings
# 64 so tests can run past it.
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32, "beta_slow": 1}
_MLA_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
                   max_position_embeddings=256)
MLA_PEERS = {
    # V2-Lite's shape: q_proj, softmax greedy, 2 shared experts, YaRN with mscale = mscale_all_dim
    "v2-lite": ("v2", dict(q_lora_rank=None, n_shared_experts=2,
                           rope_parameters=_YARN | {"mscale": 0.707, "mscale_all_dim": 0.707})),
    # V2: low-rank q, group-limited greedy, scaled
    "v2-group-limited": ("v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    routed_scaling_factor=16.0, n_shared_experts=2,
                                    rope_parameters=_YARN | {"mscale": 0.707, "mscale_all_dim": 0.707})),
    # V3: sigmoid + bias, noaux_tc in groups, normalized and scaled; YaRN with mscale != mscale_all_dim
    # (cos/sin are scaled too)
    "v3-noaux-tc": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                               rope_parameters=_YARN | {"mscale": 1.0, "mscale_all_dim": 0.8})),
    # V3 with plain RoPE in rotate-half layout (rope_interleave false) and q_proj
    "v3-plain-rope": ("v3", dict(q_lora_rank=None, n_group=2, topk_group=1, n_shared_experts=1, rope_interleave=False)),
}


def hf_mla_model(name: str, seed: int = 0):
    """transformers' model for ``MLA_PEERS[name]`` with seeded random weights; norms and the V3
    correction bias are perturbed (the default init sets them to 1 and 0, which would hide a
    mixed-up norm), and the router weights enlarged (no near-ties between implementations)."""
    import transformers  # lazy: optional dependency (test extra)

    family, kw = MLA_PEERS[name]
    cls, cfg_cls = ((transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config) if family == "v2" else
                    (transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config))
    torch.manual_seed(seed)
    model = cls(cfg_cls(**_MLA_COMMON, **kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif n.endswith("mlp.gate.weight"):
                p.mul_(10.0)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy decoding with its own cache (a plain loop: no logits processors)."""
    ids = torch.tensor([prompt])
    out, cache = [], None
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=ids, cache=cache, use_cache=True)
            cache = res.cache
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


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
