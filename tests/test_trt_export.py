"""The ``tensorrt`` target: ONNX with DsRoute/DsMoE plugin nodes, the plugin library beside it, the
engine command lines; every plugin node of an export driven through the plugin library as
TensorRT's ONNX parser would (its fields, types, symbolic shapes, formats, workspace, round trip).

Every routing variant as a one-layer MoE block through the tensorrt lowering and the one ONNX
export path (:func:`dsmoe.export.export_module`); ``slow``: a whole-decoder export (tiny, V3
routing: bias, groups, normalization, scaling) through ``dsmoe-export`` and its directory, graph,
weights and command lines, and the V1 (no bias) and bf16 decoders. The TensorRT-only steps
(``--engine``, ``--verify``, ``--backend tensorrt``) refuse in one line here; their runs are in
``test_trt_engine.py`` (marker ``tensorrt``).
"""

from __future__ import annotations

import json
import shlex

import onnx
import pytest
import torch
from conftest import ROUTING_VARIANTS, run_cli
from torch.export import Dim

import dsmoe
from dsmoe.app.cli import export_main
from dsmoe.config import DeepseekConfig
from dsmoe.export import export_layer, io_names, lower
from dsmoe.export.onnx_writer import OPSET
from dsmoe.export.tensorrt import SCRIPT_FILE, TRT_OPSETS, TRT_PARSER_OPS
from dsmoe.ir import unlift
from dsmoe.plugins.trt import harness as H
from dsmoe.plugins.trt.spec import LIBRARY, NAMESPACE, ONNX_DOMAIN, PLUGINS

V3 = ROUTING_VARIANTS["v3-noaux-tc"]
SETS = [a for k, v in V3.items() for a in ("--set", f"{k}={json.dumps(v)}")]
ONNX_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
              onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool",
              onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trt_plugins):
    out = tmp_path_factory.mktemp("trt") / "tiny-v3"
    try:
        export_main(["preset:tiny", "--target", "tensorrt", "--out", str(out), *SETS])
    except SystemExit as e:
        assert e.code in (0, None), e.code
    return out, json.loads((out / "export_report.json").read_text()), onnx.load(str(out / "model.onnx"))


def graph_types(model: onnx.ModelProto) -> dict[str, tuple[str, list]]:
    """name → (dtype, dims with symbols as text) for the graph's inputs, outputs, values, initializers."""
    out = {i.name: (ONNX_TYPES[i.data_type], list(i.dims)) for i in model.graph.initializer}
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        t = v.type.tensor_type
        out[v.name] = (ONNX_TYPES[t.elem_type], [d.dim_param or d.dim_value for d in t.shape.dim])
    return out


def check_plugin_nodes(lib, model: onnx.ModelProto, profile_t: int = 4096) -> dict[str, int]:
    """Every plugin node through the library as TensorRT's ONNX parser and builder would drive it."""
    types = graph_types(model)
    inits = {i.name for i in model.graph.initializer}
    creators = {c.name: c for c in lib.creators()}
    seen: dict[str, int] = {}
    for n in (n for n in model.graph.node if n.domain == ONNX_DOMAIN):
        spec = next(p for p in PLUGINS.values() if p.name == n.op_type)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        c = creators[n.op_type]
        # 1. the creator the parser looks up: op type, plugin_version, plugin_namespace
        assert (attrs["plugin_version"].decode(), attrs["plugin_namespace"].decode()) == (c.version, c.namespace)
        fields, skipped = H.fields_from_onnx(n, [f[0] for f in c.fields])
        assert skipped == [], skipped  # the exporter writes every field
        p = lib.create(c.name, c.version, c.namespace, fields, layer=n.name)
        assert p is not None, lib.last_log
        # 2. outputs: count, dtypes, shapes for the symbolic T, as the exporter declared them
        ins = [types[i] for i in n.input]
        assert p.nb_outputs() == len(n.output)
        assert p.output_types([t for t, _ in ins]) == (0, [types[o][0] for o in n.output])
        status, shapes = p.output_shapes([d for _, d in ins])
        assert status == 0 and shapes == [[str(d) for d in types[o][1]] for o in n.output], (shapes, lib.last_log)
        assert isinstance(ins[0][1][0], str)  # T is dynamic
        # 3. weights are initializers of static shape; formats of the node's dtypes are supported
        assert all(i in inits for i in n.input[1 if spec.op == "route" else 3:]), n.input
        io = [H.dynamic_desc([-1 if isinstance(d, str) else d for d in dims], t) for t, dims in
              ins + [types[o] for o in n.output]]
        assert all(p.supports(pos, io, len(ins)) for pos in range(len(io)))
        # 4. configure for a profile T in [1, profile_t] and size the workspace
        def prof(t, dims):
            lo = [1 if isinstance(d, str) else d for d in dims]
            hi = [profile_t if isinstance(d, str) else d for d in dims]
            return H.dynamic_desc([-1 if isinstance(d, str) else d for d in dims], t, lo, hi)
        pin, pout = [prof(*x) for x in ins], [prof(*types[o]) for o in n.output]
        assert p.configure(pin, pout) == 0, lib.last_log
        assert p.workspace(pin, pout) > 0
        # 5. the round trip: fields to serialize → runtime-phase creation → the same fields
        ser = p.serialize()
        q = lib.create(c.name, c.version, c.namespace, ser, phase="runtime")
        assert q is not None and q.serialize().as_dict() == ser.as_dict() == fields.as_dict()
        seen[n.op_type] = seen.get(n.op_type, 0) + 1
    return seen


# ---- the whole decoder through dsmoe-export ------------------------------------------------------

@pytest.mark.slow  # the decoder export (~15 s)
def test_export_directory(exported):
    out, report, _ = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([".dsmoe-output.json", "model.onnx", "config.json",
                                                           "export_report.json", LIBRARY, "plugins.json", SCRIPT_FILE])
    assert report["target"] == "tensorrt" and set(report["files"]) == {p.name for p in out.iterdir()} - {".dsmoe-output.json"}
    assert report["lowering"]["lowered"]["dsmoe::route"] == {"DsRoute plugin": 2}
    assert report["lowering"]["lowered"]["dsmoe::moe"] == {"DsMoE plugin": 2}
    assert report["tensorrt"]["archs"] == ["sm_80", "sm_90"] and report["tensorrt"]["engine"] is None
    assert json.loads((out / "plugins.json").read_text())["namespace"] == NAMESPACE


@pytest.mark.slow  # the decoder export (~15 s)
def test_onnx_is_what_tensorrts_parser_takes(exported):
    _, report, model = exported
    assert {o.domain: o.version for o in model.opset_import} == {"": OPSET, ONNX_DOMAIN: 1}
    assert TRT_OPSETS[0] <= OPSET <= TRT_OPSETS[1]
    std = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    assert std <= TRT_PARSER_OPS, std - TRT_PARSER_OPS
    assert {n.domain for n in model.graph.node} == {"", ONNX_DOMAIN}  # no com.microsoft contrib ops
    assert report["ort_fusions"] == {}
    names_in, names_out = io_names(3)
    assert [i.name for i in model.graph.input] == names_in and [o.name for o in model.graph.output] == names_out
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.slow  # the decoder export (~15 s)
def test_every_plugin_node_through_the_library(exported, trt_plugins):
    _, _, model = exported
    assert check_plugin_nodes(trt_plugins[1], model) == {"DsRoute": 2, "DsMoE": 2}


@pytest.mark.slow  # the decoder export (~15 s)
def test_weights_are_initializers_in_the_canonical_layout(exported):
    """w13 [E,2I,H] = gate rows then up rows of each expert, w2 [E,H,I], the router weight and its fp32 bias."""
    _, _, model = exported
    eager = dsmoe.load("preset:tiny", overrides=V3)
    inits = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    moe = next(n for n in model.graph.node if n.op_type == "DsMoE")
    route = next(n for n in model.graph.node if n.op_type == "DsRoute")
    layer = eager.model.layers[1].mlp
    w13, w2 = inits[moe.input[3]], inits[moe.input[4]]
    for e, ex in enumerate(layer.experts):
        assert torch.equal(w13[e], torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
        assert torch.equal(w2[e], ex.down_proj.weight)
    assert torch.equal(inits[route.input[1]], layer.gate.weight)
    assert inits[route.input[2]].dtype == torch.float32 and torch.equal(inits[route.input[2]],
                                                                        layer.gate.e_score_correction_bias)


@pytest.mark.slow  # the decoder export (~15 s)
def test_engine_command_lines(exported):
    out, report, _ = exported
    cmds = report["tensorrt"]["commands"]
    script = (out / SCRIPT_FILE).read_text()
    assert shlex.join(cmds["trtexec"]) in script and shlex.join(cmds["polygraphy"]) in script
    t = {a.split("=")[0]: a.split("=", 1)[1] for a in cmds["trtexec"] if "=" in a}
    assert t["--onnx"] == "model.onnx" and t["--dynamicPlugins"] == f"./{LIBRARY}" and "--stronglyTyped" in cmds["trtexec"]
    assert "--noTF32" in cmds["trtexec"]  # an fp32 engine is checked at 1e-4
    names = io_names(3)[0]
    prof = report["tensorrt"]["profile"]
    assert list(prof) == names
    for which, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        got = dict(item.rsplit(":", 1) for item in t[flag].split(","))
        assert got == {n: "x".join(map(str, prof[n][which])) for n in names}
    for n, s in prof.items():
        assert all(a <= b <= c for a, b, c in zip(s["min"], s["opt"], s["max"])), n
    L = 256  # tiny: max_position_embeddings
    assert prof["input_ids"]["max"] == [4, L] and prof["attention_mask"]["max"] == [4, L]
    assert prof["past_key_values.0.key"]["min"] == [1, 4, 0, 16] and prof["past_key_values.0.key"]["max"] == [4, 4, L - 1, 16]
    poly = cmds["polygraphy"]
    assert poly[:4] == ["env", "DSMOE_TRT_REGISTER_ON_LOAD=1", "polygraphy", "convert"] and poly[-2:] == ["-o", "model.engine"]


# ---- every routing variant: a one-layer MoE block, the same lowering and ONNX export path --------

class MoEBlock(torch.nn.Module):
    """``dsmoe::route`` → ``dsmoe::moe`` with a variant's routing (what the passes make of a MoE layer)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        E, Hd, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        g = torch.Generator().manual_seed(0)
        self.w_gate = torch.nn.Parameter(torch.randn(E, Hd, generator=g))
        self.bias = (torch.nn.Parameter(torch.randn(E, generator=g) * 0.1) if config.topk_method == "noaux_tc"
                     else None)
        self.w13 = torch.nn.Parameter(torch.randn(E, 2 * I, Hd, generator=g) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(E, Hd, I, generator=g) * 0.1)
        self.routing = config.routing.as_kwargs()

    def forward(self, x):
        w, ids = torch.ops.dsmoe.route(x, self.w_gate, self.bias, **self.routing)
        return torch.ops.dsmoe.moe(x, w, ids, self.w13, self.w2, "silu")


@pytest.mark.parametrize("variant", list(ROUTING_VARIANTS))
def test_every_routing_variant_exports_plugin_nodes(trt_plugins, tmp_path, variant):
    config = DeepseekConfig.from_name("tiny", **ROUTING_VARIANTS[variant])
    block = MoEBlock(config)
    x = torch.randn(3, config.hidden_size)
    T = Dim("T", min=1, max=1 << 16)
    gm = unlift(torch.export.export(block, (x,), dynamic_shapes=({0: T},), strict=False))
    report = lower(gm, target="tensorrt")
    assert report.lowered == {"dsmoe::route": {"DsRoute plugin": 1}, "dsmoe::moe": {"DsMoE plugin": 1}}
    export_layer(gm, x, tmp_path / "block.onnx")
    model = onnx.load(str(tmp_path / "block.onnx"))
    assert check_plugin_nodes(trt_plugins[1], model) == {"DsRoute": 1, "DsMoE": 1}
    route = next(n for n in model.graph.node if n.op_type == "DsRoute")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in route.attribute}
    r = config.routing
    assert (attrs["scoring"].decode(), attrs["topk_method"].decode(), attrs["top_k"], attrs["n_group"],
            attrs["topk_group"], attrs["norm_topk_prob"], attrs["scale_when"].decode()) == (
        r.scoring, r.topk_method, r.top_k, r.n_group, r.topk_group, int(r.norm_topk_prob), r.scale_when)
    assert attrs["scaling"] == pytest.approx(r.scaling) and len(route.input) == (3 if block.bias is not None else 2)


# ---- the TensorRT-only steps refuse in one line here; misuse is refused before any work ----------

def one_line(code, err, want, *needles):
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("· ")]
    assert code == want and len(lines) == 1 and "Traceback" not in err, (code, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.parametrize("flags, needle", [(["--engine"], "--engine needs TensorRT"),
                                           (["--verify"], "--verify with --target tensorrt")])
def test_engine_and_verify_need_tensorrt(capsys, tmp_path, flags, needle):
    if _has_tensorrt():
        pytest.skip("TensorRT is installed here (test_trt_engine.py runs these)")
    code, _, err = run_cli(capsys, "preset:tiny", "--target", "tensorrt", "--out", tmp_path / "o", *flags, entry=export_main)
    one_line(code, err, 2, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # the decoder export (~15 s)
def test_backends_and_targets_do_not_mix(capsys, exported, tmp_path):
    out, _, _ = exported
    code, _, err = run_cli(capsys, "preset:tiny", "--target", "tensorrt", "--out", out, entry=export_main)
    one_line(code, err, 2, "already exists")
    code, _, err = run_cli(capsys, "generate", out, "--prompt-ids", "1 2", "--backend", "ort")
    one_line(code, err, 2, "is a TensorRT export", "--backend tensorrt")
    code, _, err = run_cli(capsys, "generate", out, "--prompt-ids", "1 2", "--backend", "tensorrt")
    one_line(code, err, 2, "model.engine does not exist" if _has_tensorrt() else "needs TensorRT")


def test_misused_tensorrt_options_are_refused_before_any_work(capsys, trt_plugins, tmp_path):
    for flags, needle in ((["--target", "ort", "--arch", "sm_90"], "--arch apply to --target tensorrt only"),
                          (["--target", "ort", "--max-batch", "2"], "--max-batch apply to --target tensorrt only"),
                          (["--target", "ort", "--dtype", "bf16"], "dtype for --target ort"),
                          (["--target", "tensorrt", "--arch", "sm_75"], "unsupported architecture"),
                          (["--target", "tensorrt", "--max-batch", "0"], "max batch >= 1"),
                          (["--target", "tensorrt", "--max-length", "1"], "max length >= 2")):
        code, _, err = run_cli(capsys, "preset:tiny", "--out", tmp_path / "o", *flags, entry=export_main)
        one_line(code, err, 2, needle)


def test_missing_nvcc_or_headers_is_one_line(capsys, tmp_path, monkeypatch):
    import dsmoe.plugins.trt.build as build

    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(tmp_path))
    for argv, entry in ((["build-plugins", "--out", tmp_path / "p"], None),
                        (["preset:tiny", "--target", "tensorrt", "--out", tmp_path / "o"], export_main)):
        code, _, err = run_cli(capsys, *argv, entry=entry)
        one_line(code, err, 2, "TensorRT headers not found", str(tmp_path))
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    code, _, err = run_cli(capsys, "build-plugins", "--out", tmp_path / "p")
    one_line(code, err, 2, "nvcc not found")
    assert not (tmp_path / "p").exists() and not (tmp_path / "o").exists()


def test_build_plugins_command(capsys, trt_plugins, tmp_path):
    out = tmp_path / "plugins"
    code, _, err = run_cli(capsys, "build-plugins", "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= {LIBRARY, "libdsmoe_trt_harness.so", "plugins.json", "manifest.json"}
    assert (out / LIBRARY).read_bytes() == trt_plugins[0].library.read_bytes()  # the cached build
    one_line(*run_cli(capsys, "build-plugins", "--out", out)[::2], 2, "already exists")
    assert run_cli(capsys, "build-plugins", "--out", out, "--force")[0] == 0
    H.PluginLibrary(out / LIBRARY, out / "libdsmoe_trt_harness.so").creators()


# ---- slow: the V1 decoder (no bias input) and a bf16 decoder -------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("variant, dtype", [("v1-softmax-greedy", "fp32"), ("v2-group-limited", "bf16")])
def test_more_decoders(trt_plugins, tmp_path, variant, dtype):
    from dsmoe.export import export_model

    report = export_model("preset:tiny", out=str(tmp_path / "o"), target="tensorrt", dtype=dtype,
                          overrides={**ROUTING_VARIANTS[variant], "num_hidden_layers": 2})
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert check_plugin_nodes(trt_plugins[1], model) == {"DsRoute": 1, "DsMoE": 1}
    assert report["dtype"] == dtype and ("--noTF32" in report["tensorrt"]["commands"]["trtexec"]) == (dtype == "fp32")
    route = next(n for n in model.graph.node if n.op_type == "DsRoute")
    assert len(route.input) == 2  # softmax routings have no bias input
    assert graph_types(model)[route.input[0]][0] == dtype



@pytest.mark.slow
def test_an_mla_model_exports_for_tensorrt_with_its_latent_cache(trt_plugins, tmp_path, capsys):
    """MLA models take the tensorrt target too: plugin nodes for the MoE, the absorbed attention in
    standard ops, the latent cache (``dsmoe.cache``) as the inputs and in the engine's profile."""
    out = tmp_path / "mla-trt"
    code, _, err = run_cli(capsys, "preset:mla-tiny", "--target", "tensorrt", "--out", out, entry=export_main)
    assert code == 0, err
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.op_type for n in model.graph.node if n.domain == ONNX_DOMAIN} == {"DsRoute", "DsMoE"}
    names = [i.name for i in model.graph.input]
    assert names == io_names(dsmoe.load_config("preset:mla-tiny"))[0] and "past_key_values.0.latent" in names
    script = (out / SCRIPT_FILE).read_text()
    assert "past_key_values.0.latent:1x1x0x40" in script and "past_key_values.0.key" not in script
