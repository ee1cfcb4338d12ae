"""The benchmark harness, fast: tiny preset, one timed call, fixed limits (no microbenchmarks).

Timing numbers are never asserted; what is asserted is that every backend runs, a wrong backend
is rejected before timing, the JSON has the documented fields and the floor arithmetic holds.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsmoe import bench
from dsmoe.bench.backends import REGISTRY, Backend, Prepared, cached_fused_graph, register
from dsmoe.bench.limits import Limits, Work, floor_s, model_step_work, moe_layer_work
from dsmoe.bench.suites import model_workload
from dsmoe.bench.timing import ONCE, Method, cross_check, measure
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError

LIMITS = Limits(bandwidth_gbs=10.0, gemm_gflops=100.0, bandwidth_bytes=0, gemm_n=0)


def _run(tmp_path, suite, backends=None, method=ONCE, **kw):
    return bench.run_bench(suites=[suite], backends=backends, quick=True, out_dir=tmp_path, threads=1,
                           progress=False, preset="tiny", method=method, limits=LIMITS, **kw)


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, _run(out, "moe-layer", ["eager", "fused", "grouped_mm", "ort", "ort-cuda"], tokens=[1, 5])


def test_every_backend_runs_on_the_layer(layer_run):
    _, r = layer_run
    doc = r["suites"]["moe-layer"]
    for case in doc["cases"]:
        for name in ("eager", "fused", "grouped_mm", "ort"):
            res = case["results"][name]
            assert res["status"] == "ok", (name, res)
            assert res["check"]["ok"] and res["timing"]["iters"] == 1
            assert res["latency_s"] > 0 and res["vs_eager"] > 0 and res["floor_fraction"] > 0
    assert doc["backends"]["fused"]["notes"]["ops"].get("dsmoe::moe") == 1
    if not torch.cuda.is_available():
        assert doc["backends"]["ort-cuda"]["status"] == "skipped" and doc["backends"]["ort-cuda"]["reason"]


def test_json_has_the_documented_fields(layer_run):
    out, r = layer_run
    path = out / f"{r['machine']['name']}-moe-layer-quick.json"
    assert {p.rsplit(".", 1)[1] for p in r["files"]} == {"json", "md", "png"}
    doc = json.loads(path.read_text())
    for key in ("schema", "suite", "quick", "created", "machine", "versions", "dtype", "seed", "shapes", "method",
                "limits", "backends", "cases", "goals", "load"):
        assert key in doc, key
    assert {"name", "cpu", "cores", "threads", "memory_gb"} <= set(doc["machine"])
    assert {"torch", "onnxruntime", "dsmoe"} <= set(doc["versions"])
    assert {"warmup", "min_iters", "max_iters", "budget_s"} <= set(doc["method"])
    assert {"bandwidth_gbs", "gemm_gflops"} <= set(doc["limits"])
    case = doc["cases"][0]
    assert {"case", "tokens", "per", "work", "floor", "results", "info"} <= set(case)
    assert {"memory_s", "compute_s", "floor_s", "bound"} <= set(case["floor"])
    assert {"status", "check", "timing", "latency_s", "vs_eager", "floor_fraction"} <= set(case["results"]["ort"])
    assert {"median_s", "min_s", "max_s", "iqr_s", "spread", "iters", "warmup"} <= set(case["results"]["ort"]["timing"])
    assert [g["goal"] for g in doc["goals"]] == [g for g, _, _ in bench.GOALS["moe-layer"]]
    md = path.with_suffix(".md").read_text()
    for word in (doc["machine"]["cpu"], "cores", "GiB", "torch", "onnxruntime", "fp32", "warm-up", "H=64"):
        assert word in md, word


def test_wrong_backend_is_rejected_and_not_timed(tmp_path):
    calls = {"n": 0}

    def prepare(w, threads):
        def fn(x):
            calls["n"] += 1
            return w.eager(x) * 1.01  # 1% off: a wrong kernel
        return Prepared(fn)

    register(Backend("wrong", "deliberately wrong", lambda: (True, ""), prepare))
    try:
        r = _run(tmp_path, "moe-layer", ["eager", "wrong"], tokens=[3], write=False)
    finally:
        del REGISTRY["wrong"]
    res = r["suites"]["moe-layer"]["cases"][0]["results"]["wrong"]
    assert res["status"] == "mismatch" and "timing" not in res and not res["check"]["ok"]
    assert calls["n"] == 1  # the cross-check call only: never timed


@pytest.mark.slow
def test_model_suite_runs(tmp_path):
    """Every model backend, GenAI included, on one export per cache mode; GenAI's decode case
    continues from the prompt it was primed with (run twice: the warm-up and the timed call)."""
    backends = ["eager", "fused", "ort", "genai", "ort-static", "genai-static"]
    r = _run(tmp_path, "model", backends, overrides={"num_hidden_layers": 2}, tokens=[4],
             write=False, method=Method(warmup=1, min_iters=1, max_iters=1, budget_s=0.0))
    doc = r["suites"]["model"]
    assert [c["case"].split()[0] for c in doc["cases"]] == ["prefill", "decode"]
    for case in doc["cases"]:
        for name in backends:
            assert case["results"][name]["status"] == "ok", (name, case["results"][name])
    assert doc["cases"][1]["per"] == doc["shapes"]["decode_steps"]
    assert doc["backends"]["ort"]["notes"]["onnx_ops"].get("com.microsoft::MoE") == 1  # what dsmoe-export writes
    assert doc["backends"]["ort-static"]["notes"]["kv_cache"] == "static"
    assert doc["backends"]["genai-static"]["notes"]["past_present_share_buffer"] is True
    peer = [g for g in doc["goals"] if "genai" in g["goal"]]
    assert len(peer) == 1 and peer[0]["met"] in (True, False) and peer[0]["value"] > 0


def test_a_backend_that_fails_is_reported_failed_not_skipped(tmp_path, monkeypatch):
    """A broken export (here: dsmoe-export refusing the model) is a failure of the ort backend,
    visible in the results, never a skip."""
    from dsmoe.bench import backends

    def broken(w, kv_cache="dynamic"):
        raise backends.ExportFailed("dsmoe-export exited 1: error: boom")

    monkeypatch.setattr(backends, "model_export", broken)
    r = _run(tmp_path, "model", ["eager", "ort"], overrides={"num_hidden_layers": 2}, tokens=[4], write=False)
    doc = r["suites"]["model"]
    assert doc["backends"]["ort"]["status"] == "failed" and "boom" in doc["backends"]["ort"]["reason"]
    assert all(c["results"]["ort"]["status"] == "failed" for c in doc["cases"])


def test_unknown_names_are_one_line_errors(tmp_path):
    with pytest.raises(DsmoeError, match="unknown suite"):
        bench.run_bench(suites=["nope"], out_dir=tmp_path, progress=False)
    with pytest.raises(DsmoeError, match="unknown backend"):
        bench.run_bench(suites=["moe-layer"], backends=["nope"], out_dir=tmp_path, progress=False)


# ---- arithmetic ---------------------------------------------------------------------------

def test_floor_arithmetic_by_hand():
    # tiny: H=64, E=8, K=2, I=32, shared I=64. T=2 tokens hitting 3 distinct experts, fp32.
    cfg = DeepseekConfig.from_name("tiny")
    w = moe_layer_work(cfg, T=2, hit_experts=3)
    weights = 8 * 64 + 3 * (3 * 64 * 32) + 3 * 64 * 64       # router + 3 experts + shared = 31_232
    assert w.bytes == (weights + 2 * 2 * 64) * 4 == 125_952
    assert w.flops == 2 * 2 * (8 * 64 + 2 * 3 * 64 * 32 + 3 * 64 * 64) == 100_352
    f = floor_s(w, Limits(bandwidth_gbs=1.0, gemm_gflops=1.0, bandwidth_bytes=0, gemm_n=0))
    assert f["memory_s"] == pytest.approx(125_952e-9) and f["compute_s"] == pytest.approx(100_352e-9)
    assert f["floor_s"] == f["memory_s"] and f["bound"] == "memory"
    f = floor_s(w, Limits(bandwidth_gbs=1000.0, gemm_gflops=1.0, bandwidth_bytes=0, gemm_n=0))
    assert f["bound"] == "compute" and f["floor_s"] == pytest.approx(100_352e-9)


def test_16b_layer_matches_the_spec():
    # spec §5: one token touches 6 routed + 2 shared experts ≈ 138 MFLOP and 138 MB of bf16 weights
    cfg = DeepseekConfig.from_name("deepseek-moe-16b")
    w = moe_layer_work(cfg, T=1, hit_experts=6, itemsize=2)
    assert w.bytes == pytest.approx(138e6, rel=0.01)
    assert w.flops == pytest.approx(138e6, rel=0.02)


def test_model_step_work_adds_up():
    cfg = DeepseekConfig.from_name("tiny", num_hidden_layers=2)  # layer 0 dense, layer 1 MoE
    H, V, d, nh = 64, 256, 16, 4
    w = model_step_work(cfg, S=1, past=3, hits=[2])
    proj = 4 * H * H
    attn = Work((proj + 2 * H * 3) * 4, 2 * proj + 4 * nh * d * 1 * 4)
    dense = Work(3 * H * 160 * 4, 2 * 3 * H * 160)
    expected = Work(H * 4, 0) + attn + dense + attn + moe_layer_work(cfg, 1, 2) + Work(H * V * 4, 2 * H * V)
    assert w.bytes == expected.bytes and w.flops == expected.flops


def test_cross_check_and_measure():
    a = torch.ones(4)
    assert cross_check((a, [a]), (a, [a])).ok
    assert not cross_check(a * 1.01, a).ok
    assert not cross_check(a.new_full((4,), float("nan")), a).ok
    assert not cross_check(torch.ones(3), a).ok
    t = measure(lambda: None, Method(warmup=1, min_iters=3, max_iters=3, budget_s=0.0))
    assert t.iters == 3 and t.min_s <= t.median_s <= t.max_s


# ---- the GPU side, as far as it can be checked without a GPU ---------------------------------

def test_cuda_backends_are_listed_as_skipped_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    r = _run(tmp_path, "moe-layer", None, tokens=[2], write=False)
    doc = r["suites"]["moe-layer"]
    for name in ("cuda", "cuda-graph"):
        assert doc["backends"][name]["status"] == "skipped" and "no CUDA device" in doc["backends"][name]["reason"]
        assert doc["cases"][0]["results"][name]["status"] == "skipped"
    with pytest.raises(DsmoeError, match="no CUDA device here"):
        bench.run_bench(suites=["moe-layer"], device="cuda", out_dir=tmp_path, progress=False)


def test_share_expert_weights_keeps_eager_output_and_one_copy():

    w = model_workload("preset:tiny", {"num_hidden_layers": 2}, prefill=4, decode=1)
    args = w.cases[0].run(lambda *a: a)  # the prefill inputs
    before = w.eager(*args)[0]
    gm, _ = cached_fused_graph(w)
    after = w.eager(*args)[0]
    assert torch.equal(before, after)
    w13 = gm.get_submodule("lm.model.layers.1.mlp.experts").w13
    gate = w.eager.lm.model.layers[1].mlp.experts[3].gate_proj.weight
    assert gate.untyped_storage().data_ptr() == w13.untyped_storage().data_ptr()
    torch.testing.assert_close(gm(*args)[0], before, rtol=1e-4, atol=1e-5)


def _case(T, floor_mem, floor_comp, **lat):
    res = {b: {"status": "ok", "latency_s": v, "vs_eager": lat["eager"] / v} for b, v in lat.items()}
    return {"case": f"T={T}", "tokens": T, "floor": {"memory_s": floor_mem, "compute_s": floor_comp,
                                                       "floor_s": max(floor_mem, floor_comp)}, "results": res}


def test_gpu_goals_by_hand():
    doc = {"suite": "moe-layer", "device": "cuda:0", "cases": [
        _case(1, 40e-6, 1e-7, eager=2e-3, cuda=50e-6, grouped_mm=100e-6),      # 1.25× floor, 40× eager, 2× gm
        _case(64, 100e-6, 5e-6, eager=3e-3, cuda=125e-6, grouped_mm=150e-6),   # 80% bandwidth, 1.2× gm
        _case(4096, 1e-3, 2e-3, eager=9e-3, cuda=5e-3, grouped_mm=5e-3),       # 40% GEMM rate
    ]}
    g = {x["goal"].split(" ")[0] + str(i): x for i, x in enumerate(bench.gpu_goals(doc))}
    assert g["cuda0"]["met"] is True and g["cuda0"]["value"] == pytest.approx(1.25)
    assert g["cuda1"]["met"] is True and g["cuda1"]["value"] == pytest.approx(40)
    assert g["cuda2"]["met"] is True and g["cuda2"]["value"] == pytest.approx(0.8)
    assert g["cuda3"]["met"] is False and g["cuda3"]["value"] == pytest.approx(0.4)
    assert g["cuda4"]["met"] is False and g["cuda4"]["value"] == pytest.approx(1.2)  # worst of T=1, 64
    doc["cases"][0]["results"]["cuda"] = {"status": "failed", "reason": "x"}
    assert bench.gpu_goals(doc)[0]["met"] is None
    # the faster of cuda and cuda-graph counts: a graph replay at 42 µs makes T=1 1.05× the floor
    doc["cases"][0]["results"]["cuda-graph"] = {"status": "ok", "latency_s": 42e-6, "vs_eager": 2e-3 / 42e-6}
    assert bench.gpu_goals(doc)[0]["value"] == pytest.approx(42 / 40)
    model = {"suite": "model", "device": "cuda", "cases": [
        {"case": "decode ×8 (per token)", "tokens": 1, "floor": {"floor_s": 1.7e-3, "memory_s": 1.7e-3, "compute_s": 0},
         "results": {"cuda-graph": {"status": "ok", "latency_s": 3e-3}}}]}
    (goal,) = bench.gpu_goals(model)
    assert goal["met"] is True and goal["value"] == pytest.approx(3 / 1.7)


@pytest.mark.slow
def test_quant_suite_runs(tmp_path):
    """ORT int4 (dsmoe-export --quant) beside eager and ORT fp32; llama.cpp runs where it is
    built and is reported as skipped with the reason where it is not."""
    from dsmoe.bench.llama_cpp import find_llama_bench

    r = _run(tmp_path, "quant", ["eager", "ort", "ort-int4", "llama.cpp-q4_0"], overrides={"num_hidden_layers": 2},
             tokens=[4], write=False)
    doc = r["suites"]["quant"]
    llama = doc["backends"]["llama.cpp-q4_0"]
    if find_llama_bench()[0] is None:
        assert llama["status"] == "skipped" and "llama-bench" in llama["reason"]
    else:
        assert llama["status"] == "ok" and llama["notes"]["gguf"]["type"] == "Q4_0"
    for case in doc["cases"]:
        q = case["results"]["ort-int4"]
        assert q["status"] == "ok", q
        assert q["floor"]["memory_s"] < case["floor"]["memory_s"] / 4  # its own, smaller floor: int4 bytes
    notes = doc["backends"]["ort-int4"]["notes"]
    assert notes["quant"]["bits"] == 4 and 0 <= notes["quality"]["top1_agreement"] <= 1
    assert [g["goal"].split()[0] for g in doc["goals"]] == ["ort-int4", "ort-int8", "ort-int4", "ort-int4"]


def test_floor_counts_quantized_weight_bytes():
    cfg = DeepseekConfig.from_name("tiny")
    fp = model_step_work(cfg, 1, 4, [2, 2])
    q = model_step_work(cfg, 1, 4, [2, 2], weight_bytes=0.625)  # int4, fp32 scale per 32
    H, V = cfg.hidden_size, cfg.vocab_size
    linears = (3 * (4 * H * H) + 3 * H * cfg.intermediate_size + 2 * (2 * 3 * H * 32 + 3 * H * 64) + H * V)
    assert fp.bytes - q.bytes == pytest.approx(linears * (4 - 0.625))
    assert q.flops == fp.flops


def test_ort_profile_sums_kernel_time_per_node_after_the_warm_up():
    from dsmoe.bench.ort_profile import kernel_times

    def run(ts):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 99000}

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [run(0), node("a", "MatMulNBits", 10, 50000),                       # the warm-up run: not counted
              run(100), node("a", "MatMulNBits", 110, 3000), node("b", "QMoE", 120, 500),
              {"cat": "Node", "name": "a_fence_before", "ts": 130, "dur": 9000, "args": {"op_name": "MatMulNBits"}},
              run(200), node("a", "MatMulNBits", 210, 1000)]
    assert kernel_times(events, skip_runs=1) == {"a": ("MatMulNBits", 2.0), "b": ("QMoE", 0.25)}
    assert kernel_times(events)["a"] == ("MatMulNBits", 18.0)
    with pytest.raises(DsmoeError, match="leave none"):
        kernel_times(events, skip_runs=3)


@pytest.mark.slow
def test_ort_profile_of_a_quantized_export(tmp_path):
    """On a tiny int4 export, the decode profiler counts K/E of QMoE's expert weights and all of
    MatMulNBits' own, and the op table's kernel time adds up to at most the step's wall time."""
    import onnx

    from dsmoe.bench.ort_profile import accuracy_sweep, markdown, node_weight_bytes, profile_export, with_accuracy_level
    from dsmoe.export import export_model

    d = tmp_path / "int4"
    export_model("preset:tiny", out=str(d), quant="int4")
    cfg = json.loads((d / "config.json").read_text())
    k_over_e = cfg["num_experts_per_tok"] / cfg["n_routed_experts"]
    m = onnx.load(str(d / "model.onnx"))  # with the weights: their bytes as numpy counts them
    nbytes = {t.name: int(onnx.numpy_helper.to_array(t).nbytes) for t in m.graph.initializer}
    weights = node_weight_bytes(d / "model.onnx", k_over_e)
    qmoe = [n for n in m.graph.node if n.op_type == "QMoE"]
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert qmoe and nbits
    for n in qmoe:
        assert weights[n.name] == int(sum(nbytes.get(i, 0) for i in n.input) * k_over_e) > 0
    for n in nbits:
        assert weights[n.name] == sum(nbytes.get(i, 0) for i in n.input) > 0

    run = profile_export(d, past=8, steps=2, threads=1)
    assert {"QMoE", "MatMulNBits"} <= set(run["ops"]) and run["quant"] == "int4"
    assert 0 < run["kernels_ms"] <= run["wall_ms"]
    assert run["weight_bytes"] == sum(r["bytes"] for r in run["ops"].values()) > 0
    inplace = profile_export(d, past=8, steps=2, threads=1, kv_inplace=True, last_logits=True)  # as generation runs
    assert "GroupQueryAttention" in inplace["ops"] and "MultiHeadAttention" not in inplace["ops"]
    assert all(inplace["ops"][op]["bytes"] == run["ops"][op]["bytes"] for op in ("QMoE", "MatMulNBits"))
    assert inplace["kv_inplace"]
    run["accuracy_levels"] = accuracy_sweep(d, [0, 4], past=8, steps=1, threads=1)
    assert [a["accuracy_level"] for a in run["accuracy_levels"]] == [0, 4]
    text = markdown([run], bandwidth_gbs=10.0, machine={"cpu": "x", "cores": 2}, past=8, steps=2, threads=1)
    assert "| QMoE |" in text and "| MatMulNBits |" in text and "| 0 |" in text

    portable = tmp_path / "portable"  # ONNX Runtime fuses its DequantizeLinear + MatMul: refused, never undercounted
    export_model("preset:tiny", out=str(portable), target="portable", quant="int4")
    with pytest.raises(DsmoeError, match="portable export"):
        profile_export(portable, past=8, steps=1, threads=1)
    with pytest.raises(DsmoeError, match="no MatMulNBits nodes"):
        with_accuracy_level(portable, 0, tmp_path / "nothing-to-change")
    assert not (tmp_path / "nothing-to-change").exists()
    lvl0 = with_accuracy_level(d, 0, tmp_path / "level0")
    levels = {a.i for n in onnx.load(str(lvl0 / "model.onnx"), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0} and (lvl0 / "config.json").read_text() == (d / "config.json").read_text()


def test_ort_profile_bad_input_is_one_line(tmp_path, capsys):
    from dsmoe.bench.ort_profile import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "holds no model.onnx" in err[0]
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--steps", "0"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
