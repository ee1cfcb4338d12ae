"""benchmarks/mla_decode.py, fast: mla-tiny, one timed call, fixed limits. Timings are never
asserted; the cross-check, the KV-cache numbers, the files and the ratios' bookkeeping are."""

from __future__ import annotations

import json

import pytest

from dsmoe.bench.limits import Limits
from dsmoe.bench.mla_decode import markdown, run_mla_decode
from dsmoe.bench.timing import ONCE
from dsmoe.errors import DsmoeError

LIMITS = Limits(bandwidth_gbs=10.0, gemm_gflops=100.0, bandwidth_bytes=0, gemm_n=0)


def _run(tmp_path, backends):
    return run_mla_decode(quick=True, backends=backends, out_dir=tmp_path, threads=1, method=ONCE, limits=LIMITS,
                          contexts=[8, 40], progress=lambda s: None)


def test_fused_backends_run_and_are_checked(tmp_path):
    doc = _run(tmp_path, ["eager", "fused-expanded", "fused"])
    assert [c["context"] for c in doc["cases"]] == [8, 40]
    for case in doc["cases"]:
        for name in ("eager", "fused-expanded", "fused"):
            r = case["results"][name]
            assert r["status"] == "ok" and r["check"]["ok"] and r["timing"]["iters"] == 1, (name, r)
        assert "vs_expanded" in case["results"]["fused"] and "vs_expanded" not in case["results"]["fused-expanded"]
    assert doc["backends"]["fused"]["absorb_mla_rewrites"] == 2
    assert doc["backends"]["fused"]["ops"]["dsmoe::mla_attention"] == 2
    assert "dsmoe::mla_attention" not in doc["backends"]["fused-expanded"]["ops"]
    kv = doc["kv_cache"]["fp32"]
    assert (kv["bytes_per_token"], kv["expanded_bytes_per_token"]) == (2 * 40 * 4, 2 * 160 * 4)
    on_disk = json.loads((tmp_path / f"{doc['machine']['name']}-mla-decode-quick.json").read_text())
    assert on_disk["cases"][1]["results"]["fused"]["status"] == "ok"
    assert sorted(p.rsplit(".", 1)[1] for p in doc["files"]) == ["json", "md", "png"]
    md = markdown(doc)
    assert "| 40 | fused |" in md and "KV cache per token" in md


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(DsmoeError, match="unknown backend 'gpu'"):
        _run(tmp_path, ["gpu"])
