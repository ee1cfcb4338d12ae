"""TensorRT engines of ``--target tensorrt`` exports (marker ``tensorrt``: needs the tensorrt package
and a GPU; skipped elsewhere — no machine of this project has had TensorRT so far).

The engine is built with the TensorRT Python API from the export directory (the plugin library
loaded through ``IPluginRegistry.load_library``), verified against eager on prefill and decode, and
drives greedy generation with the same KV-cache loop as the ONNX Runtime backend.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROUTING_VARIANTS, run_cli

import dsmoe
from dsmoe.app.cli import export_main
from dsmoe.app.generate import eager_step, greedy_generate
from dsmoe.export import ENGINE_FILE, TrtDecoder, build_engine
from dsmoe.ir import sample_inputs

tensorrt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA device")]
PROMPT = [1, 5, 9, 17, 33]


@pytest.mark.parametrize("variant, dtype", [("v1-softmax-greedy", "fp32"), ("v3-noaux-tc", "fp32"),
                                            ("v3-noaux-tc", "fp16"), ("v2-group-limited", "bf16")])
def test_engine_verifies_and_generates(capsys, tmp_path, variant, dtype):
    sets = [a for k, v in ROUTING_VARIANTS[variant].items() for a in ("--set", f"{k}={json.dumps(v)}")]
    out = tmp_path / "trt"
    code, _, err = run_cli(capsys, "preset:tiny", "--target", "tensorrt", "--dtype", dtype, "--out", out, "--verify",
                           "--max-batch", "2", "--max-length", "64", *sets, entry=export_main)
    assert code == 0, err
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["passed"] and report["tensorrt"]["engine"] == ENGINE_FILE
    model = dsmoe.load("preset:tiny", overrides=ROUTING_VARIANTS[variant], dtype=dtype)
    want = greedy_generate(eager_step(model), model.config, PROMPT, 8, dtype=next(model.parameters()).dtype)
    code, stdout, err = run_cli(capsys, "generate", out, "--prompt-ids", " ".join(map(str, PROMPT)),
                                "--max-new-tokens", "8", "--backend", "tensorrt", "--json")
    assert code == 0, err
    if dtype == "fp32":  # 16-bit engines round in another order than eager: tokens may differ after a near-tie
        assert json.loads(stdout)["ids"] == want


def test_engine_rebuilt_from_the_directory_matches_eager(tmp_path):
    out = tmp_path / "trt"
    export_main_ok(["preset:tiny", "--target", "tensorrt", "--out", str(out), "--max-length", "64"])
    build_engine(out)
    dec = TrtDecoder(out)
    model = dsmoe.load("preset:tiny")
    for batch, seq, past in [(1, 1, 0), (2, 7, 0), (2, 1, 9)]:
        args = sample_inputs(model.config, batch=batch, seq=seq, past=past, seed=seq)
        with torch.no_grad():
            ref, _ = model(*args, use_cache=True)
        got, present = dec(*args)
        assert (ref - got.float().cpu()).abs().max() <= 1e-4 * ref.abs().max()
        assert present[0][0].shape == (batch, model.config.num_key_value_heads, past + seq, model.config.head_dim)


def export_main_ok(argv):
    try:
        export_main(argv)
    except SystemExit as e:
        assert e.code in (0, None)
