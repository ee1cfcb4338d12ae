"""The TensorRT plugins' ``enqueue`` on a GPU (marker ``gpu``): the harness calls it on device
buffers, as an engine would, over the kernel sweeps of test_triton_route.py / test_triton_moe.py
(H and I rounded up to the multiples of 16 the AOT kernels take; x and w_gate of one dtype) and the
DeepSeekMoE-16B / V3 layer shapes, and compares with the ops' references. Outputs are poisoned with
NaN first, so an element a kernel forgets to write fails.

The library must be built for the GPU's architecture (``dsmoe build-plugins``; a GPU machine
without nvcc takes a prebuilt one from ``DSMOE_TRT_PLUGINS=DIR``).
"""

from __future__ import annotations

import onnx
import pytest
import torch
from test_triton_moe import MOE_CASES, check_moe, make_moe_inputs, moe_reference
from test_triton_route import ROUTE_CASES, check_route, make_route_inputs

import dsmoe.ops  # noqa: F401
from dsmoe.plugins.trt import harness as H
from dsmoe.plugins.trt.spec import MOE, NAMESPACE, ROUTE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "int32"}


def up16(n: int) -> int:
    return -(-n // 16) * 16


def _plugin(lib, spec, values):
    creator = next(c for c in lib.creators() if c.name == spec.name)
    node = onnx.helper.make_node(spec.name, [], [], **spec.node_attributes(values))
    fields, _ = H.fields_from_onnx(node, [f[0] for f in creator.fields])
    p = lib.create(spec.name, spec.version, NAMESPACE, fields)
    assert p is not None, lib.last_log
    return p


def enqueue(lib, p, inputs: list[torch.Tensor | None], outputs: list[torch.Tensor]) -> None:
    """configurePlugin → getWorkspaceSize → onShapeChange → enqueue, as an engine runs a layer."""
    ins = [t for t in inputs if t is not None]
    dyn = [H.dynamic_desc(list(t.shape), DT[t.dtype]) for t in ins]  # a profile of this one shape
    dout = [H.dynamic_desc(list(t.shape), DT[t.dtype]) for t in outputs]
    assert p.configure(dyn, dout) == 0, lib.last_log
    ws = torch.empty(max(p.workspace(dyn, dout), 1), dtype=torch.uint8, device="cuda")
    descs = [H.tensor_desc(list(t.shape), DT[t.dtype]) for t in ins]
    odescs = [H.tensor_desc(list(t.shape), DT[t.dtype]) for t in outputs]
    assert p.on_shape_change(descs, odescs) == 0, lib.last_log
    for t in outputs:
        t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)
    stream = torch.cuda.current_stream().cuda_stream
    status = p.enqueue(descs, odescs, [t.data_ptr() for t in ins], [t.data_ptr() for t in outputs], ws.data_ptr(), stream)
    assert status == 0, lib.last_log
    torch.cuda.synchronize()


def run_route(lib, x, w_gate, bias, K, attrs):
    p = _plugin(lib, ROUTE, dict(attrs, top_k=K, norm_topk_prob=int(attrs["norm_topk_prob"])))
    xc, wc = x.cuda(), w_gate.cuda()
    bc = None if bias is None else bias.float().cuda()
    T = x.shape[0]
    out = [torch.empty(T, K, device="cuda"), torch.empty(T, K, dtype=torch.int32, device="cuda")]
    enqueue(lib, p, [xc, wc, bc], out)
    return out


ROUTE_PLUGIN_CASES = [(T, up16(Hd), E, K, attrs, xd) for T, Hd, E, K, attrs, xd, _ in ROUTE_CASES]


@pytest.mark.parametrize("case", range(len(ROUTE_PLUGIN_CASES)))
def test_route_enqueue_matches_reference(trt_plugins, case):
    T, Hd, E, K, attrs, dt = ROUTE_PLUGIN_CASES[case]
    x, w_gate, bias = make_route_inputs(T, Hd, E, attrs, dt, dt, seed=case)
    ref = torch.ops.dsmoe.route(x, w_gate, bias, top_k=K, **attrs)
    check_route(run_route(trt_plugins[1], x, w_gate, bias, K, attrs), ref, x, w_gate, bias, K, attrs)


MOE_PLUGIN_CASES = [(T, K, E, up16(Hd), up16(I), dt, load) for T, K, E, Hd, I, dt, load in MOE_CASES]
MOE_PLUGIN_CASES += [(T, 6, 64, 2048, 1408, torch.bfloat16, "random") for T in (1, 128, 4096)]  # DeepSeekMoE 16B


@pytest.mark.parametrize("case", range(len(MOE_PLUGIN_CASES)))
def test_moe_enqueue_matches_reference(trt_plugins, case):
    T, K, E, Hd, I, dt, load = MOE_PLUGIN_CASES[case]
    x, weights, ids, w13, w2 = make_moe_inputs(T, K, E, Hd, I, dt, load, seed=case)
    p = _plugin(trt_plugins[1], MOE, {})
    y = torch.empty(T, Hd, dtype=dt, device="cuda")
    enqueue(trt_plugins[1], p, [x.cuda(), weights.cuda(), ids.cuda(), w13.cuda(), w2.cuda()], [y])
    check_moe(y, moe_reference(x, weights, ids, w13, w2), dt)


@pytest.mark.parametrize("T", [1, 33, 1024])
def test_v3_layer_route_then_moe(trt_plugins, T):
    """DeepSeek-V3 routing (256 experts, groups, bias) into the moe plugin, as two plugin layers."""
    lib = trt_plugins[1]
    attrs = dict(scoring="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
                 scaling=2.5, scale_when="always")
    Hd, E, K, I = 1024, 256, 8, 256
    x, w_gate, bias = make_route_inputs(T, Hd, E, attrs, torch.bfloat16, torch.bfloat16, seed=T)
    w, ids = run_route(lib, x, w_gate, bias, K, attrs)
    check_route((w, ids), torch.ops.dsmoe.route(x, w_gate, bias, top_k=K, **attrs), x, w_gate, bias, K, attrs)
    _, _, _, w13, w2 = make_moe_inputs(T, K, E, Hd, I, torch.bfloat16, "random", seed=T)
    y = torch.empty(T, Hd, dtype=torch.bfloat16, device="cuda")
    enqueue(lib, _plugin(lib, MOE, {}), [x.cuda(), w, ids, w13.cuda(), w2.cuda()], [y])
    check_moe(y, moe_reference(x, w.cpu(), ids.cpu(), w13, w2), torch.bfloat16)
