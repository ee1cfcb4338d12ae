"""The TensorRT plugin library through the plugin ABI, without TensorRT or a GPU.

The harness (``plugins/trt/harness.cpp`` + ``harness.py``) loads the library as TensorRT does and
calls each IPluginV3 method with what TensorRT would pass; fields come from ONNX nodes the way
TensorRT's ONNX parser builds them. Checked: the library's linkage, creators vs the spec, every
routing variant's fields, output types and symbolic shapes, format combinations, configuration,
workspace size, the serialization round trip, refused fields and shapes (never a crash), and that
the launch plan equals the PyTorch launchers' configuration over a sweep of shapes.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from conftest import ROUTING_VARIANTS

from dsmoe.config import DeepseekConfig
from dsmoe.plugins import _triton
from dsmoe.plugins.aot import ARCHS, parse_arch
from dsmoe.plugins.moe import config as mc
from dsmoe.plugins.moe.config import all_moe_configs, moe_config
from dsmoe.plugins.route import config as rc
from dsmoe.plugins.route.config import all_route_configs, route_config, validate_route
from dsmoe.plugins.trt import harness as H
from dsmoe.plugins.trt.spec import LIMITS, MOE, NAMESPACE, ONNX_DOMAIN, PLUGINS, ROUTE, WORKSPACE_ALIGN

TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ELEM = {"i32": 4, "fp32": 4, "fp16": 2, "bf16": 2}


def node(spec, values: dict) -> onnx.NodeProto:
    """A plugin node as the exporter writes it (op type = plugin name, every field an attribute)."""
    return onnx.helper.make_node(spec.name, [], [], domain=ONNX_DOMAIN, **spec.node_attributes(values))


def create(lib, spec, values=None, *, fields=None, phase="build"):
    if fields is None:
        creator = next(c for c in lib.creators() if c.name == spec.name)
        fields, _ = H.fields_from_onnx(node(spec, values or {}), [f[0] for f in creator.fields])
    return lib.create(spec.name, spec.version, NAMESPACE, fields, phase=phase, layer="test_node")


def route_values(variant: str) -> dict:
    r = DeepseekConfig.from_name("tiny", **ROUTING_VARIANTS[variant]).routing
    return {**r.as_kwargs(), "norm_topk_prob": int(r.norm_topk_prob)}


# ---- the library ---------------------------------------------------------------------------------

def test_library_links_no_driver_no_tensorrt(trt_plugins):
    build, _ = trt_plugins
    if not (shutil.which("readelf") and shutil.which("nm")):
        pytest.skip("binutils (readelf, nm) are not installed")
    dyn = subprocess.run(["readelf", "-d", str(build.library)], capture_output=True, text=True, check=True).stdout
    needed = {line.split("[")[1].split("]")[0] for line in dyn.splitlines() if "(NEEDED)" in line}
    assert needed <= {"libstdc++.so.6", "libgcc_s.so.1", "libc.so.6", "libm.so.6", "libdl.so.2", "ld-linux-x86-64.so.2"}
    syms = subprocess.run(["nm", "-D", "--defined-only", str(build.library)], capture_output=True, text=True).stdout
    exported = {ln.split()[-1] for ln in syms.splitlines() if " T " in ln}
    assert {"getCreators", "setLoggerFinder"} <= exported
    with pytest.raises(OSError):  # this machine has no driver; the library loaded above regardless
        ctypes.CDLL("libcuda.so.1")


def test_struct_mirrors_match_the_headers(trt_plugins):
    _, lib = trt_plugins
    for name, cls in H.STRUCTS.items():
        assert lib._h.h_sizeof(name.encode()) == ctypes.sizeof(cls), name


def test_creators_are_the_spec(trt_plugins):
    _, lib = trt_plugins
    creators = {c.name: c for c in lib.creators()}
    assert set(creators) == {p.name for p in PLUGINS.values()}
    for spec in PLUGINS.values():
        c = creators[spec.name]
        assert (c.kind, c.version, c.namespace) == ("PLUGIN CREATOR_V3ONE", spec.version, NAMESPACE)
        want = [(f.name, {"int": "INT32", "float": "FLOAT32", "string": "CHAR"}[f.kind]) for f in spec.fields]
        assert [(n, t) for n, t, _ in c.fields] == want


# ---- every routing variant: fields, types, shapes, formats, workspace, serialization -------------

@pytest.mark.parametrize("variant", list(ROUTING_VARIANTS))
def test_route_plugin_of_every_variant(trt_plugins, variant):
    _, lib = trt_plugins
    values = route_values(variant)
    p = create(lib, ROUTE, values)
    assert p is not None, lib.last_log
    assert p.info() == {"core": "PLUGIN_V3ONE_CORE", "build": "PLUGIN_V3ONE_BUILD", "runtime": "PLUGIN_V3ONE_RUNTIME",
                        "name": "DsRoute", "version": "1", "namespace": NAMESPACE}
    K, E, Hd = values["top_k"], 8, 64
    bias = values["topk_method"] == "noaux_tc"
    ins = ["fp16", "fp16"] + (["fp32"] if bias else [])
    assert p.nb_outputs() == 2 and p.output_types(ins) == (0, ["fp32", "int32"])
    dims = [["T", Hd], [E, Hd]] + ([[E]] if bias else [])
    assert p.output_shapes(dims) == (0, [["T", str(K)], ["T", str(K)]])
    assert_roundtrip(lib, ROUTE, p, values)


def assert_roundtrip(lib, spec, p, values):
    """Fields to serialize → create in the runtime phase → identical fields (defaults filled in)."""
    got = p.serialize()
    want = spec.node_attributes(values)
    kinds = {"int": "INT32", "float": "FLOAT32", "string": "CHAR"}
    assert got.as_dict() == {f.name: (kinds[f.kind], want[f.name]) for f in spec.fields}
    for f in got.fields:
        if f.type == "CHAR":  # the bytes and the NUL, counted, as the ONNX parser passes them
            assert f.length == len(want[f.name]) + 1 and bytes(f.values)[-1:] == b"\0"
    q = create(lib, spec, fields=got, phase="runtime")
    assert q is not None, lib.last_log
    assert q.serialize().as_dict() == got.as_dict()
    assert p.clone().serialize().as_dict() == got.as_dict() == p.attach().serialize().as_dict()


def test_moe_plugin(trt_plugins):
    _, lib = trt_plugins
    p = create(lib, MOE)
    assert p is not None, lib.last_log
    assert p.output_types(["bf16", "fp32", "int32", "bf16", "bf16"]) == (0, ["bf16"])
    assert p.output_shapes([["T", 64], ["T", 2], ["T", 2], [8, 64, 64], [8, 64, 32]]) == (0, [["T", "64"]])
    assert_roundtrip(lib, MOE, p, {})


FORMATS = [("fp32", H.LINEAR), ("fp16", H.LINEAR), ("bf16", H.LINEAR), ("int32", H.LINEAR), ("int64", H.LINEAR),
           ("int8", H.LINEAR), ("fp16", H.CHW2)]


def _accepted(p, io_types, pos, nb_inputs):
    out = set()
    for dt, fmt in FORMATS:
        io = [H.dynamic_desc([-1, 64], t) for t in io_types[:pos]] + [H.dynamic_desc([-1, 64], dt, fmt=fmt)]
        io += [H.dynamic_desc([-1, 64], "fp32")] * (len(io_types) - pos - 1)
        if p.supports(pos, io, nb_inputs):
            out.add(dt if fmt == H.LINEAR else f"{dt}/chw2")
    return out


@pytest.mark.parametrize("x", ["fp32", "fp16", "bf16"])
def test_format_combinations(trt_plugins, x):
    _, lib = trt_plugins
    floats = {"fp32", "fp16", "bf16"}
    route = create(lib, ROUTE, route_values("v3-noaux-tc"))
    io = [x, x, "fp32", "fp32", "int32"]
    assert [_accepted(route, io, pos, 3) for pos in range(5)] == [floats, {x}, {"fp32"}, {"fp32"}, {"int32"}]
    io = [x, x, "fp32", "int32"]  # no bias input
    assert [_accepted(route, io, pos, 2) for pos in range(4)] == [floats, {x}, {"fp32"}, {"int32"}]
    moe = create(lib, MOE)
    io = [x, "fp32", "int32", x, x, x]
    assert [_accepted(moe, io, pos, 5) for pos in range(6)] == [floats, {"fp32"}, {"int32"}, {x}, {x}, {x}]


def _route_io(dt, T, E, Hd, K, bias=True, tmax=None):
    lo, hi = [1, Hd], [tmax or T, Hd]
    ins = [H.dynamic_desc([-1, Hd], dt, lo, hi), H.dynamic_desc([E, Hd], dt)] + ([H.dynamic_desc([E], "fp32")] if bias else [])
    outs = [H.dynamic_desc([-1, K], "fp32", [1, K], [tmax or T, K]), H.dynamic_desc([-1, K], "int32", [1, K], [tmax or T, K])]
    return ins, outs


def _moe_io(dt, T, E, Hd, K, I, tmax=None):
    t = tmax or T
    ins = [H.dynamic_desc([-1, Hd], dt, [1, Hd], [t, Hd]), H.dynamic_desc([-1, K], "fp32", [1, K], [t, K]),
           H.dynamic_desc([-1, K], "int32", [1, K], [t, K]), H.dynamic_desc([E, 2 * I, Hd], dt),
           H.dynamic_desc([E, Hd, I], dt)]
    return ins, [H.dynamic_desc([-1, Hd], dt, [1, Hd], [t, Hd])]


def _align(n):
    return -(-n // WORKSPACE_ALIGN) * WORKSPACE_ALIGN


def _bytes(buffers, dt, sizes):
    return [_triton.evaluate(b.numel, **sizes) * ELEM[dt if b.type == "{x}" else b.type] for b in buffers]


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("tmax", [1, 16, 4096])
def test_workspace_bounds_every_configuration(trt_plugins, dt, tmax):
    """Workspace = the largest over every configuration of the dtype (all archs, both paths) at the
    profile's largest T, each buffer 256-aligned: what the PyTorch launchers would allocate."""
    _, lib = trt_plugins
    E, Hd, K, I = 64, 2048, 6, 1408
    sizes = dict(T=tmax, H=Hd, E=E, K=K, I=I)
    route = create(lib, ROUTE, {"top_k": K})
    ins, outs = _route_io(dt, tmax, E, Hd, K)
    assert route.configure(ins, outs) == 0, lib.last_log
    want = max(sum(map(_align, _bytes([*c.buffers, *ROUTE.extra_buffers], dt, sizes)))
               for a in ARCHS for c in all_route_configs(parse_arch(a)))
    assert route.workspace(ins, outs) == want
    moe = create(lib, MOE)
    ins, outs = _moe_io(dt, tmax, E, Hd, K, I)
    assert moe.configure(ins, outs) == 0, lib.last_log
    want = max(sum(map(_align, _bytes(c.buffers, dt, sizes))) for a in ARCHS
               for c, dts in all_moe_configs(parse_arch(a)) if TORCH[dt] in dts)
    assert moe.workspace(ins, outs) == want > 4 * tmax * K * Hd


# ---- refused, never crashed on -------------------------------------------------------------------

def F(name, typ, values, length=None):
    if typ == "CHAR":
        return H.Field(name, typ, values, len(values) if length is None else length)
    return H.Field(name, typ, values, len(values) if length is None else length)


TOPK = F("top_k", "INT32", [2])
BAD_ROUTE_FIELDS = {
    "missing top_k": ([], "missing required field 'top_k'"),
    "top_k as float": ([F("top_k", "FLOAT32", [2.0])], "must be one INT32"),
    "top_k array": ([F("top_k", "INT32", [2, 3])], "must be one INT32"),
    "scoring as int": ([TOPK, F("scoring", "INT32", [0])], "must be CHAR"),
    "scaling as int": ([TOPK, F("scaling", "INT32", [1])], "must be one FLOAT32"),
    "top_k 0": ([F("top_k", "INT32", [0])], "outside [1, 8]"),
    "top_k 9": ([F("top_k", "INT32", [9])], "outside [1, 8]"),
    "n_group 0": ([TOPK, F("n_group", "INT32", [0])], "'n_group' = 0"),
    "norm 2": ([TOPK, F("norm_topk_prob", "INT32", [2])], "outside [0, 1]"),
    "scaling nan": ([TOPK, F("scaling", "FLOAT32", [math.nan])], "not a finite number"),
    "scaling inf": ([TOPK, F("scaling", "FLOAT32", [math.inf])], "not a finite number"),
    "unknown scoring": ([TOPK, F("scoring", "CHAR", b"tanh\0")], "is not one of softmax, sigmoid"),
    "unterminated string": ([TOPK, F("scoring", "CHAR", b"sigmoidXX", 7)], None),  # 7 bytes read: "sigmoid"
    "unknown field": ([TOPK, F("topk", "INT32", [2])], "unknown field 'topk'"),
    "twice": ([TOPK, TOPK], "given twice"),
    "too many groups": ([TOPK, F("topk_method", "CHAR", b"noaux_tc\0"), F("n_group", "INT32", [16])], "n_group must be <= 8"),
    "kept > groups": ([TOPK, F("topk_method", "CHAR", b"group_limited_greedy\0"), F("n_group", "INT32", [4]),
                       F("topk_group", "INT32", [5])], "topk_group must lie in [1, n_group=4]"),
}


@pytest.mark.parametrize("case", list(BAD_ROUTE_FIELDS))
def test_bad_route_fields_are_refused(trt_plugins, case):
    _, lib = trt_plugins
    fields, message = BAD_ROUTE_FIELDS[case]
    p = create(lib, ROUTE, fields=H.FieldList(fields))
    if message is None:  # accepted: the string ends where its length says
        assert p is not None and p.serialize().as_dict()["scoring"] == ("CHAR", "sigmoid")
        return
    assert p is None
    assert lib.last_log.startswith("DsRoute (test_node): ") and message in lib.last_log, lib.last_log


def test_bad_moe_fields_and_null_collections_are_refused(trt_plugins):
    _, lib = trt_plugins
    assert create(lib, MOE, fields=H.FieldList([F("activation", "CHAR", b"gelu\0")])) is None
    assert "'gelu' is not one of silu" in lib.last_log
    assert lib._h.h_create(lib._lib, b"DsMoE", b"1", NAMESPACE.encode(), b"n", None, 0)  # no fields: all defaults
    assert lib.create("DsMoE", "2", NAMESPACE, H.FieldList([])) is None and "no creator" in lib.last_log
    assert lib.create("DsMoE", "1", "", H.FieldList([])) is None  # the namespace is part of the key


# ---- shape checks: the same answers as validate_route, plus the AOT kernels' alignment -----------

ATTRS = [dict(scoring="softmax", topk_method="greedy", top_k=6, n_group=1, topk_group=1),
         dict(scoring="softmax", topk_method="group_limited_greedy", top_k=6, n_group=8, topk_group=3),
         dict(scoring="sigmoid", topk_method="noaux_tc", top_k=8, n_group=8, topk_group=4),
         dict(scoring="sigmoid", topk_method="noaux_tc", top_k=2, n_group=4, topk_group=1)]


@pytest.mark.parametrize("attrs", ATTRS, ids=lambda a: f"{a['topk_method']}-k{a['top_k']}-g{a['n_group']}")
def test_shape_checks_agree_with_validate_route(trt_plugins, attrs):
    _, lib = trt_plugins
    values = dict(attrs, norm_topk_prob=1, scaling=2.5, scale_when="always")
    p = create(lib, ROUTE, values)
    assert p is not None, lib.last_log
    for E in (1, 2, 4, 6, 8, 12, 16, 24, 64, 160, 256, 257, 512):
        try:
            validate_route(1, 64, E, **{**values, "norm_topk_prob": True})
            ok = True
        except ValueError:
            ok = False
        status, _ = p.output_shapes([["T", 64], [E, 64], [E]])
        assert (status == 0) == ok, (E, lib.last_log)
    validate_route(1, 24, 256, **{**values, "norm_topk_prob": True})  # the PyTorch path takes any H ...
    assert p.output_shapes([["T", 24], [256, 24], [256]])[0] != 0 and "divisible by 16" in lib.last_log  # ... the AOT kernels not


@pytest.mark.parametrize("shapes, message", [
    ([["T", 64], ["T", 2], ["T", 2], [8, 64, 64], [8, 64, 48]], "inconsistent shapes"),
    ([["T", 64], ["T", 2], ["T", 3], [8, 64, 64], [8, 64, 32]], "inconsistent shapes"),
    ([["T", 64], ["T", 2], ["T", 2], [600, 64, 64], [600, 64, 32]], "E <= 512"),
    ([["T", 40], ["T", 2], ["T", 2], [8, 64, 40], [8, 40, 32]], "multiples of 16"),
    ([["T", 64], ["T", 2], ["T", 2], [8, 48, 64], [8, 64, 24]], "multiples of 16"),
])
def test_moe_shape_checks(trt_plugins, shapes, message):
    _, lib = trt_plugins
    p = create(lib, MOE)
    assert p.output_shapes(shapes)[0] != 0 and message in lib.last_log, lib.last_log


def test_configure_refuses_mixed_dtypes_and_enqueue_without_a_driver_fails_cleanly(trt_plugins):
    _, lib = trt_plugins
    p = create(lib, ROUTE, {"top_k": 2})
    ins, outs = _route_io("fp16", 8, 8, 64, 2)
    ins[1] = H.dynamic_desc([8, 64], "fp32")
    assert p.configure(ins, outs) != 0 and "x and w_gate" in lib.last_log
    assert p.plan(90) == "no shapes yet (onShapeChange has not run)"
    ins = [H.tensor_desc([4, 64], "fp16"), H.tensor_desc([8, 64], "fp16")]
    outs = [H.tensor_desc([4, 2], "fp32"), H.tensor_desc([4, 2], "int32")]
    assert p.on_shape_change(ins, outs) == 0, lib.last_log
    assert p.enqueue(ins, outs, [0, 0], [0, 0], 0, 0) != 0  # this machine: no libcuda.so.1
    assert "enqueue: no CUDA driver: cannot load libcuda.so.1" in lib.last_log
    assert p.plan(75).startswith("no kernels built for sm_75")


# ---- the launch plan equals the PyTorch launchers' configuration ---------------------------------

SHAPES = [(1, 8, 2, 64, 32), (5, 8, 2, 64, 32), (16, 64, 6, 2048, 1408), (17, 64, 6, 2048, 1408),
          (170, 64, 6, 2048, 1408), (4096, 64, 6, 2048, 1408), (1, 256, 8, 7168, 2048), (200, 256, 8, 7168, 2048),
          (3, 160, 6, 5120, 1536), (1000, 72, 4, 512, 256), (0, 8, 2, 64, 32)]


def _check_launches(plan, cfg, dt, sizes, values):
    assert plan["path"] == cfg.path and plan["dtype"] == dt
    assert [ln["kernel"] for ln in plan["launches"]] == [ln.kernel for ln in cfg.launches]
    for got, launch in zip(plan["launches"], cfg.launches):
        assert tuple(got["grid"]) == launch.grid_of(**sizes), launch.kernel
        assert (got["block"], got["num_stages"]) == (32 * launch.num_warps, launch.num_stages), launch.kernel
        want = dict(launch.constexprs, **({"F32_DOT": dt == "fp32"} if "F32_DOT" in got["constexprs"] else {}))
        assert got["constexprs"] == want, launch.kernel
        for name, v in values.items():
            if name in got["args"]:
                assert got["args"][name] == pytest.approx(v), (launch.kernel, name)


@pytest.mark.parametrize("arch", [parse_arch(a) for a in ARCHS])
@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
def test_launch_plans_equal_the_pytorch_launchers(trt_plugins, arch, dt):
    _, lib = trt_plugins
    v3 = dict(scoring="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=1, scaling=2.5,
              scale_when="always")
    for T, E, K, Hd, I in SHAPES:
        sizes = dict(T=T, H=Hd, E=E, K=K, I=I)
        # route: configuration, grids, the select kernel's codes (validate_route's)
        values = dict(v3, top_k=K) if E % 8 == 0 and E >= 16 else {"top_k": K}
        full = {f.name: v for f, v in zip(ROUTE.fields, list(ROUTE.node_attributes(values).values())[2:])}
        a = validate_route(T, Hd, E, **{**full, "norm_topk_prob": bool(full["norm_topk_prob"])})
        p = create(lib, ROUTE, values)
        ins = [H.tensor_desc([T, Hd], dt), H.tensor_desc([E, Hd], dt), H.tensor_desc([E], "fp32")]
        outs = [H.tensor_desc([T, K], "fp32"), H.tensor_desc([T, K], "int32")]
        assert p.on_shape_change(ins, outs) == 0, lib.last_log
        plan = p.plan(arch)
        cfg = route_config(T, E, K, Hd, TORCH[dt], arch)
        _check_launches(plan, cfg, dt, sizes, dict(T=T, E=E, H=Hd, K=a.K, n_group=a.n_group, topk_group=a.topk_group,
                                                   scoring=a.scoring, method=a.method, normalize=a.normalize,
                                                   scale=a.scale, scaling=a.scaling))
        assert [(b["name"], b["bytes"]) for b in plan["buffers"]] == list(
            zip(["logits", "bias"], _bytes([*cfg.buffers, *ROUTE.extra_buffers], dt, sizes)))
        # moe: configuration, grids, workspace layout, P and MB
        m = create(lib, MOE)
        ins = [H.tensor_desc([T, Hd], dt), H.tensor_desc([T, K], "fp32"), H.tensor_desc([T, K], "int32"),
               H.tensor_desc([E, 2 * I, Hd], dt), H.tensor_desc([E, Hd, I], dt)]
        assert m.on_shape_change(ins, [H.tensor_desc([T, Hd], dt)]) == 0, lib.last_log
        plan = m.plan(arch)
        cfg = moe_config(T, E, K, Hd, I, TORCH[dt], arch)
        mb = _triton.evaluate(cfg.mb, **sizes)
        _check_launches(plan, cfg, dt, sizes, dict(T=T, H=Hd, E=E, K=K, I=I, P=T * K, MB=mb))
        got = [(b["name"], b["bytes"], b["zeroed"]) for b in plan["buffers"]]
        assert got == [(b.name, n, b.zeroed) for b, n in zip(cfg.buffers, _bytes(cfg.buffers, dt, sizes))]
        offsets = [b["offset"] for b in plan["buffers"]]
        assert all(o % WORKSPACE_ALIGN == 0 for o in offsets) and offsets == sorted(offsets)
        assert plan["workspace"] == sum(_align(b["bytes"]) for b in plan["buffers"])


def test_limits_come_from_the_config_modules():
    assert LIMITS["ROUTE_MAX_E"] == rc.MAX_E and LIMITS["MOE_MAX_E"] == mc.MAX_E and LIMITS["ROUTE_MAX_K"] == rc.MAX_K
    assert [f.choices for f in ROUTE.fields if f.name == "scoring"] == [tuple(rc.SCORINGS)]


def test_register_on_load_without_libnvinfer_loads_and_says_so(trt_plugins):
    """DSMOE_TRT_REGISTER_ON_LOAD=1 (polygraphy's bare dlopen) with no libnvinfer in the process:
    the library still loads, registers nothing, and says why on stderr (no logger yet)."""
    build, _ = trt_plugins
    code = f"import ctypes; lib = ctypes.CDLL({str(build.library)!r}); print(bool(lib.getCreators))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DSMOE_TRT_REGISTER_ON_LOAD": "1"})
    assert p.returncode == 0 and p.stdout.strip() == "True", p.stderr
    assert "no libnvinfer.so.11 is loaded in this process: nothing registered" in p.stderr
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == ""
