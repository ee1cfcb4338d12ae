"""End to end under the Triton interpreter: the tiny preset's fused graph, its dsmoe::route and
dsmoe::moe dispatched to the interpreted Triton kernels (use_triton_kernels), generates eager's
greedy tokens; outside the block the CPU reference is back."""

from __future__ import annotations

import pytest
import torch

from dsmoe.plugins import _triton

if not torch.cuda.is_available():
    _triton.enable_interpreter()  # before capture: torch.export imports triton

from conftest import tiny

from dsmoe import plugins
from dsmoe.ir import capture
from dsmoe.ops import MOE, ROUTE
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline
from dsmoe.app.generate import eager_step, greedy_generate

pytestmark = pytest.mark.skipif(not _triton.interpreter_active(),
                                reason="triton is compiled here (CUDA present): test_cuda_ops.py covers the GPU")

PROMPT = [1, 17, 42, 7, 99]


@pytest.mark.parametrize("variant", ["v1-softmax-greedy", "v3-noaux-tc"])
def test_fused_graph_on_interpreted_triton_kernels_generates_eagers_tokens(variant, monkeypatch):
    model = tiny(variant)
    ref = greedy_generate(eager_step(model), model.config, PROMPT, 8)
    gm, _ = run_pipeline(capture(model), PassContext())
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(ROUTE) == targets.count(MOE) == 2  # the tiny preset's two MoE layers

    calls = []
    for name in ("route_triton", "moe_triton"):  # what the CPU dispatch of dsmoe.plugins calls
        real = getattr(plugins, name)
        monkeypatch.setattr(plugins, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    with plugins.use_triton_kernels("interpret"):
        assert plugins.cpu_kernels() == "interpret"
        got = greedy_generate(gm, model.config, PROMPT, 8)
    assert got == ref
    assert calls.count("route_triton") == calls.count("moe_triton") == 2 * 8  # 2 layers x 8 steps
    n = len(calls)
    assert plugins.cpu_kernels() == "reference"
    assert greedy_generate(gm, model.config, PROMPT, 2) == ref[:2] and len(calls) == n  # reference again
