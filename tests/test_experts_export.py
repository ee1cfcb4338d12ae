"""``dsmoe-export --router-stats``: the router outputs of an ONNX export equal the eager router
token for token; without the flag the export has none; ``dsmoe experts`` and ``dsmoe generate
--router-stats`` read them like the eager and fused backends."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import run_cli, tiny

import dsmoe
from dsmoe.app.router_trace import eager_router_step
from dsmoe.export import OrtDecoder, export_model, io_names, lower
from dsmoe.export.onnx_writer import to_onnx
from dsmoe.ir import capture, sample_inputs
from dsmoe.passes.context import PassContext
from dsmoe.passes.expose_router import router_output_name
from dsmoe.passes.pipeline import run_pipeline

FIELDS = ["ids", "weights", "routed_norm", "shared_norm"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny preset exported for ort with --router-stats (verified); ``root / "plain"`` is for
    an export without (:func:`plain`)."""
    root = tmp_path_factory.mktemp("rs")
    stats = export_model("preset:tiny", out=str(root / "stats"), router_stats=True, verify=True)
    return root, stats


@pytest.fixture(scope="module")
def plain(exports):
    root, _ = exports
    return export_model("preset:tiny", out=str(root / "plain"))


def _router_matches_eager(model, dec, shapes=((2, 6, 0), (3, 1, 4), (1, 9, 0))) -> None:
    for batch, seq, past in shapes:
        args = sample_inputs(model.config, batch=batch, seq=seq, past=past, seed=batch + seq + past)
        with torch.no_grad(), eager_router_step(model) as eager:
            ref_logits, _, ref = eager(*args)
        logits, _, got = dec(*args)
        assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
        assert list(got) == list(ref) == model.config.moe_layers
        for layer in ref:
            assert got[layer]["ids"].dtype == torch.int32 and got[layer]["ids"].shape == (batch * seq, 2)
            # token for token: the same expert in the same slot (both sides take route()'s top-k order)
            assert torch.equal(got[layer]["ids"], ref[layer]["ids"]), (layer, batch, seq, past)
            for f in ("weights", "routed_norm", "shared_norm"):
                if f in ref[layer]:
                    torch.testing.assert_close(got[layer][f], ref[layer][f], rtol=1e-4, atol=1e-5)


def test_report_and_onnx_carry_the_router_outputs(exports):
    root, stats = exports
    L = 3
    names = [router_output_name(layer, f) for layer in (1, 2) for f in FIELDS]
    assert stats["outputs"] == io_names(L)[1] + names
    assert stats["router_outputs"]["layers"] == [1, 2] and stats["router_outputs"]["fields"] == {1: FIELDS, 2: FIELDS}
    v = stats["verification"]
    assert v["passed"] and v["router_agreement"] == 1.0 and "router ids agree on 32/32" in v["summary"]
    on_disk = json.loads((root / "stats" / "export_report.json").read_text())
    assert on_disk["outputs"] == stats["outputs"] and on_disk["router_outputs"]["fields"] == {"1": FIELDS, "2": FIELDS}
    proto = onnx.load(str(root / "stats" / "model.onnx"), load_external_data=False)
    outs = {o.name: o for o in proto.graph.output}
    dims = [d.dim_param or d.dim_value for d in outs["router.1.ids"].type.tensor_type.shape.dim]
    assert dims == ["batch_x_sequence", 2] and outs["router.1.ids"].type.tensor_type.elem_type == onnx.TensorProto.INT32


@pytest.mark.slow
def test_without_the_flag_the_graph_has_no_router_outputs(exports, plain):
    _, stats = exports
    assert plain["outputs"] == io_names(3)[1] and plain["router_outputs"] is None
    assert "ReduceL2" not in plain["onnx_ops"] and "TopK" not in plain["onnx_ops"]  # routing stays inside the MoE op
    # the router outputs only add nodes: every op of the plain graph is in the stats graph as often
    assert all(stats["onnx_ops"].get(op, 0) >= n for op, n in plain["onnx_ops"].items())
    assert stats["onnx_ops"]["ReduceL2"] == 4 and stats["onnx_ops"]["com.microsoft::MoE"] == 2


def test_ort_router_outputs_equal_the_eager_router(exports):
    root, _ = exports
    dec = OrtDecoder(root / "stats", router_stats=True)
    _router_matches_eager(dsmoe.load("preset:tiny"), dec)
    assert len(OrtDecoder(root / "stats")(*sample_inputs(dec.config, batch=1, seq=2, past=0))) == 2


@pytest.mark.slow
def test_an_export_without_router_outputs_is_one_line(exports, plain, capsys):
    root, _ = exports
    code, _, err = run_cli(capsys, "experts", root / "plain", "--random", "1")
    assert code == 2 and "has no router outputs" in err and "--router-stats" in err and len(err.strip().splitlines()) == 1


def test_experts_and_generate_on_the_export_equal_eager(exports, capsys):
    root, _ = exports
    code, out, err = run_cli(capsys, "experts", root / "stats", "--random", "3", "--seq-len", "12", "--json",
                             "--compare", "preset:tiny")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["backend"] == "ort" and doc["tokens"] == 36 and doc["compare"]["backend"] == "eager"
    assert doc["compare"]["mean_changed"] == 0.0 and doc["compare"]["mean_overlap"] == 1.0
    for flags, message in ((["--set", "num_hidden_layers=2"], "--set and --dtype do not apply to an export"),
                           (["--backend", "eager"], "is an ONNX export: it runs on the ort backend")):
        code, _, err = run_cli(capsys, "experts", root / "stats", "--random", "1", *flags)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    _, eager_out, _ = run_cli(capsys, "experts", "preset:tiny", "--random", "3", "--seq-len", "12", "--json")
    assert [s["counts"] for s in json.loads(eager_out)["layers"]] == [s["counts"] for s in doc["layers"]]
    runs = {}
    for backend, src in (("ort", root / "stats"), ("eager", "preset:tiny"), ("fused", "preset:tiny")):
        code, out, err = run_cli(capsys, "generate", src, "--backend", backend, "--prompt-ids", "1 5 9 17",
                                 "--max-new-tokens", "5", "--router-stats", "--json")
        assert code == 0, err
        runs[backend] = json.loads(out)
    r = runs["ort"]["router_stats"]
    assert r["tokens"] == 4 + 5 - 1 and r["calls"] == 5  # prefill, then one step per new token but the last
    for backend in ("eager", "fused"):
        assert runs[backend]["ids"] == runs["ort"]["ids"]
        assert [s["counts"] for s in runs[backend]["router_stats"]["layers"]] == [s["counts"] for s in r["layers"]]


@pytest.mark.slow
@pytest.mark.parametrize("variant,target", [("v2-group-limited", "ort"), ("v3-noaux-tc", "ort"),
                                            ("v3-noaux-tc", "portable")])
def test_router_outputs_of_each_lowering_path_equal_eager(tmp_path, variant, target):
    """The ort target's masked-logits MoE lowering (group max; sigmoid + bias + top-2-sum groups)
    and the portable one; the router-logits lowering (softmax greedy) is the export above."""
    model = tiny(variant)
    gm, _ = run_pipeline(capture(model), PassContext(router_stats=True))
    lower(gm, target=target)
    to_onnx(gm, tmp_path / "model.onnx", config=model.config, dtype=torch.float32)
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    _router_matches_eager(model, OrtDecoder(tmp_path, optimize=False, router_stats=True))
