"""Shared fixtures: the routing variants every numerical test sweeps, and small models."""

from __future__ import annotations

import pytest
import torch

import dsmoe

# Every DeepSeek routing variant, as config overrides of the tiny preset (8 experts, top-2).
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
}


def tiny(variant: str = "v1-softmax-greedy", dtype: str = "float32", seed: int = 0, **extra):
    # router weights large enough that top-k is decisive (no near-ties between implementations)
    model = dsmoe.load("preset:tiny", overrides={**ROUTING_VARIANTS[variant], **extra}, dtype=dtype, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(10.0)
    return model


@pytest.fixture(params=list(ROUTING_VARIANTS))
def variant(request):
    return request.param
