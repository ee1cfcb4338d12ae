"""The CPU peer comparison (``dsmoe bench --suite quant``): llama.cpp's own converter beside
dsmoe's GGUF writer, the bytes a GGUF reads per token, the goals and table of a run, the machine
label and the llama.cpp build options this CPU can run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dsmoe
from dsmoe.bench import peer_artifacts as art
from dsmoe.bench.gguf_export import write_gguf
from dsmoe.bench.llama_cpp import cmake_flags
from dsmoe.bench.peer import gguf_bytes_per_token
from dsmoe.bench.peer_report import machine_label, markdown, peer_goals
from dsmoe.quant import ggml_dequantize

gguf = pytest.importorskip("gguf")

ZEN4 = {"cpu": "AMD EPYC", "cores": 2, "vm": True, "family": [25, 17],
        "simd": ["avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "avx512vl", "f16c", "fma"]}


def test_machine_label_names_the_microarchitecture_and_isa():
    assert machine_label(ZEN4) == "AMD EPYC (Zen 4) 2-core VM, AVX-512/VNNI"
    xeon = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "vm": True, "family": [6, 143],
            "simd": ["amx_tile", "avx2", "avx512_vnni", "avx512f"]}
    assert machine_label(xeon) == "Intel(R) Xeon(R) Processor 2-core VM, AVX-512/VNNI/AMX"
    assert machine_label({"cpu": "AMD EPYC", "cores": 2, "family": [25, 1], "simd": ["avx2", "fma"]}) == \
        "AMD EPYC (Zen 3) 2-core, AVX2"


def test_build_options_follow_what_the_cpu_runs():
    assert cmake_flags({"avx2", "avx512f", "avx512_vnni"}, amx_ok=False) == ["-DGGML_NATIVE=ON"]  # no AMX: native
    assert cmake_flags({"avx2", "amx_tile"}, amx_ok=True) == ["-DGGML_NATIVE=ON"]                 # AMX that runs
    f = cmake_flags({"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile"}, amx_ok=False)  # AMX that faults
    assert f[0] == "-DGGML_NATIVE=OFF" and "-DGGML_AMX_TILE=OFF" in f and "-DGGML_AVX512_VNNI=ON" in f
    assert "-DGGML_AVX512_BF16=OFF" in f and "-DGGML_AVX2=ON" in f


def _doc(lat: dict[str, list[float]]) -> dict:
    """A run of four cases with the given latencies (ms) per contender, floors from fixed bytes."""
    cases = ["prefill 128", "prefill 512", "decode @128", "decode @2048"]
    res = {}
    for n, ms in lat.items():
        c = {}
        for case, x in zip(cases, ms):
            e = {"latency_s": x / 1e3}
            if case.startswith("decode"):
                e.update(bytes_per_token=1e8, floor_s=4e-3, floor_fraction=4 / x)
            else:
                e.update(flops=1e11, of_int8_peak=0.5, of_fp32_peak=0.9)
            c[case] = e
        res[n] = {"kind": "llama" if n.startswith("llama") else "ort", "path": f"/x/{n}", "gguf_bytes": 2**30,
                  "rounds": [{k: v / 1e3 for k, v in zip(cases, ms)} | {"load_s": 1.0}], "cases": c,
                  "export": {"model_bytes": 2**30, "exactness": "exact", "quality": {"top1_agreement": 1.0, "mean_kl": 0.0}}}
    return {"suite": "quant", "machine": ZEN4 | {"threads": 2, "memory_gb": 23.5}, "checkpoint": "ckpt",
            "shapes": {"layers": 4, "moe_layers": 3, "prefill": [128, 512], "context": [128, 2048], "decode": 16, "rounds": 1},
            "limits": {"bandwidth_gbs": 25.0, "gemm_gflops": 100.0, "int8_gemm_gops": 300.0},
            "load": {"start": 1.0, "end": 2.0, "rounds": [1.5]}, "versions": {"dsmoe": "0"}, "llama_bench": "lb",
            "results": res, "skipped": {}}


def test_goals_take_llama_cpps_fastest_4bit_per_case():
    doc = _doc({"ort-int4": [100, 400, 5, 8], "ort-int8": [100, 400, 8, 10],
                "llama.cpp-Q4_0": [130, 600, 6, 12], "llama.cpp-Q4_K_M": [150, 480, 7, 9],
                "llama.cpp-Q8_0": [150, 500, 10, 12]})
    g4, g8, gf = peer_goals(doc)
    # best 4-bit per case: Q4_0 130 ms, Q4_K_M 480 ms, Q4_0 6 ms, Q4_K_M 9 ms → 1.3, 1.2, 1.2, 1.125
    assert g4["value"] == pytest.approx(9 / 8) and g4["met"] is False and "decode @2048" in g4["detail"].split("worst")[1]
    assert g4["peer"] == {"prefill 128": "llama.cpp-Q4_0", "prefill 512": "llama.cpp-Q4_K_M",
                          "decode @128": "llama.cpp-Q4_0", "decode @2048": "llama.cpp-Q4_K_M"}
    assert g8["value"] == pytest.approx(1.2) and g8["met"] is True  # 10/8, 12/10, 150/100, 500/400 → worst 1.2
    assert gf["value"] == pytest.approx(0.5) and gf["met"] is False  # floor 4 ms over 8 ms at 2048
    md = markdown(doc | {"goals": [g4, g8, gf]})
    assert "AMD EPYC (Zen 4) 2-core VM, AVX-512/VNNI" in md and "| llama.cpp-Q4_K_M / ort-int4 | 1.50× | 1.20× |" in md
    del doc["results"]["llama.cpp-Q8_0"]
    assert peer_goals(doc)[1]["met"] is None  # a contender that did not run is "not measured", never met


def test_bytes_per_token_of_a_gguf(tmp_path):
    cfg = dsmoe.load_config("preset:tiny")
    path = write_gguf("preset:tiny", tmp_path / "t.gguf", qtype="Q8_0")["path"]
    want = 0.0
    for t in gguf.GGUFReader(path).tensors:
        n = float(t.n_bytes)
        want += n / cfg.vocab_size if t.name == "token_embd.weight" else n * 2 / 8 if "_exps" in t.name else n
    kv = 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * 100 * cfg.num_hidden_layers
    assert gguf_bytes_per_token(path, cfg, 100) == pytest.approx(want + kv)
    assert gguf_bytes_per_token(path, cfg, 0) < gguf_bytes_per_token(path, cfg, 100)


@pytest.mark.skipif(art.find_converter()[0] is None, reason="llama.cpp's convert_hf_to_gguf.py is not here")
def test_llama_cpps_converter_agrees_with_dsmoes_writer(tmp_path):
    """The same checkpoint through llama.cpp's converter (f32) and dsmoe's writer (Q8_0): the same
    tensor names and shapes, and the same values (q/k permuted alike) up to Q8_0 rounding."""
    ck = tmp_path / "ck"
    subprocess.run([sys.executable, "-c", "from dsmoe.app.cli import main; main()", "init", str(ck), "--preset", "tiny"],
                   check=True, capture_output=True)
    stage = art._stage(ck)
    conv, _ = art.find_converter()
    subprocess.run([sys.executable, str(conv), str(stage), "--outfile", str(tmp_path / "l.gguf"), "--outtype", "f32"],
                   check=True, capture_output=True)
    ours = {t.name: t for t in gguf.GGUFReader(write_gguf(str(ck), tmp_path / "d.gguf", qtype="Q8_0")["path"]).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "l.gguf")).tensors}
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        ref = torch.from_numpy(t.data.copy()).float()
        o = ours[name]
        got = torch.from_numpy(o.data.copy())
        if o.tensor_type.name == "Q8_0":
            got = ggml_dequantize(got, "Q8_0", ref.shape[-1])
        assert got.shape == ref.shape, name
        tol = 1e-6 + 0.01 * float(ref.abs().max())  # Q8_0: 1/254 of each block's max, at most
        assert float((got.float() - ref).abs().max()) <= tol, name


def test_last_token_logits_refuses_a_head_it_cannot_cut():
    from onnx import TensorProto, helper

    from dsmoe.errors import DsmoeError
    from dsmoe.export.runner import last_token_logits

    x = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["h"], ["logits"])], "g", [x], [y]))
    with pytest.raises(DsmoeError, match="Relu"):
        last_token_logits(m)
    x2 = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["bs", 4])  # a 2-D Gemm: its axis 1 is not positions
    y2 = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["bs", 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.5] * 12)
    m = helper.make_model(helper.make_graph([helper.make_node("Gemm", ["h", "w"], ["logits"])], "g", [x2], [y2], [w]))
    with pytest.raises(DsmoeError, match="Gemm"):
        last_token_logits(m)
    y3 = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 3])
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["h", "w"], ["logits"])], "g", [x], [y3], [w]))
    cut = last_token_logits(m)
    assert [n.op_type for n in cut.graph.node] == ["Slice", "MatMul"]
    assert cut.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 1


def test_a_run_alternates_contenders_and_divides_by_its_own_floor(tmp_path, monkeypatch):
    """run_peer's bookkeeping with the artifacts and timings stubbed: rounds rotate the order,
    the medians over rounds are reported, each decode floor is the contender's own bytes ÷ the
    bandwidth measured in the run, and the files are written."""
    import json

    from dsmoe.bench import peer
    from dsmoe.bench.limits import Limits

    cfg = dsmoe.load_config("preset:tiny")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(cfg.to_dict()))
    gg = write_gguf("preset:tiny", tmp_path / "q.gguf", qtype="Q4_0")["path"]
    quant = {"bytes": {"attention": 100}, "bytes_unquantized": {"attention": 800}, "exactness": {"summary": "exact"},
             "quality": {"top1_agreement": 1.0, "mean_kl": 0.0}}  # 0.5 bytes per weight
    exp = tmp_path / "int4"
    exp.mkdir()
    (exp / "export_report.json").write_text(json.dumps({"model_bytes": 10, "quant": quant}))
    order = []
    monkeypatch.setattr(art, "checkpoint", lambda *a: ck)
    monkeypatch.setattr(art, "export", lambda c, b, say: exp)
    monkeypatch.setattr(art, "llama_ggufs", lambda c, say, types: {"Q4_0": gg})
    monkeypatch.setattr(art, "dsmoe_gguf", lambda c, say: gg)
    monkeypatch.setattr(peer, "find_llama_bench", lambda: (tmp_path / "llama-bench", ""))
    monkeypatch.setattr(peer, "measure_limits", lambda: Limits(10.0, 100.0, 1, 1))
    monkeypatch.setattr(peer, "measure_int8_gemm_rate", lambda: 400.0)
    lat = {"ort": iter([1.0, 3.0, 2.0]), "llama": iter([2.0, 2.0, 9.0, 2.0, 9.0, 9.0])}

    def fake(kind):
        def run(path, *a):
            order.append(kind)
            x = next(lat[kind])
            return {"prefill 8": x, "decode @8": x / 100, "load_s": 0.1}
        return run

    monkeypatch.setattr(peer, "_ort_round", fake("ort"))
    monkeypatch.setattr(peer, "_llama_round", lambda path, *a: fake("llama")(path))
    doc = peer.run_peer(layers=2, rounds=3, out_dir=tmp_path / "res", progress=lambda s: None, prefill=(8,),
                        context=(8,), decode=2, cache=tmp_path, bits=(4,))
    assert [n for n in doc["results"]] == ["ort-int4", "llama.cpp-Q4_0", "llama.cpp-dsmoe-Q4_0"]
    assert order[:3] == ["ort", "llama", "llama"] and order[3] == "llama" and order[5] == "ort"  # rotated
    r = doc["results"]["ort-int4"]["cases"]
    assert r["prefill 8"]["latency_s"] == 2.0 and r["decode @8"]["latency_s"] == pytest.approx(0.02)
    want = peer.ort_bytes_per_token({"quant": quant}, dsmoe.load_config(ck), 8)
    assert r["decode @8"]["floor_fraction"] == pytest.approx(want / 10e9 / 0.02)
    llama = doc["results"]["llama.cpp-Q4_0"]["cases"]["decode @8"]
    assert llama["floor_fraction"] == pytest.approx(gguf_bytes_per_token(gg, cfg, 8) / 10e9 / llama["latency_s"])
    assert doc["goals"][0]["value"] is not None and doc["goals"][1]["met"] is None  # no int8 contender: not measured
    assert {p.rsplit(".", 1)[1] for p in doc["files"]} == {"json", "md"}
