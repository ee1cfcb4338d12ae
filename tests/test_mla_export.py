"""End to end on checkpoints saved by transformers (DeepSeek-V2-Lite-shaped, V2, V3): ``dsmoe info``,
``inspect``, ``generate`` (eager, fused, ort) and ``dsmoe-export --verify`` through the CLI, with
transformers' greedy tokens as the answer and the latent cache in the exported model."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import hf_greedy, hf_mla_model, run_cli

import dsmoe
from dsmoe.app.cli import export_main
from dsmoe.app.generate import eager_step, generate_ort, greedy_generate
from dsmoe.export import OrtDecoder, export_model

# (peer, export target, absorbed attention); each is a minute of CLI runs on 2 cores (`make
# test`); the developers' loop exports the mla-tiny preset instead (test_mla_preset_exports_and_generates)
CASES = [pytest.param("v2-lite", "ort", True, id="v2-lite-ort", marks=pytest.mark.slow),
         pytest.param("v2-group-limited", "portable", False, id="v2-portable-expanded", marks=pytest.mark.slow),
         pytest.param("v3-noaux-tc", "ort", True, id="v3-ort", marks=pytest.mark.slow)]
PROMPT = list(range(3, 61))  # 58 tokens: generation crosses original_max_position_embeddings (64)
NEW = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name → (checkpoint dir, transformers' greedy tokens)."""
    made = {}

    def get(name):
        if name not in made:
            hf = hf_mla_model(name)
            out = tmp_path_factory.mktemp("hf") / name
            hf.save_pretrained(out)
            made[name] = (out, hf_greedy(hf, PROMPT, NEW))
        return made[name]

    return get


def _ids(capsys, *argv, entry=None):
    code, out, err = run_cli(capsys, *argv, entry=entry)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name,target,absorbed", CASES)
def test_transformers_checkpoint_through_every_command(checkpoints, capsys, tmp_path, name, target, absorbed):
    """Every command on the V2-Lite-shaped checkpoint; on the others what differs by checkpoint —
    loading, routing lowering, tokens — not the pass pipeline again (inspect: the same passes,
    checked per variant in test_absorb_mla and test_passes). The V2 one is exported expanded
    (``--no-absorb-mla``): the same latent cache in and out."""
    ckpt, want = checkpoints(name)
    prompt = " ".join(map(str, PROMPT))
    info = _ids(capsys, "info", ckpt, "--json")
    assert info["kv_cache"]["entries"] == ["latent"] and info["kv_cache"]["values_per_token_per_layer"] == 40
    assert info["kv_cache"]["expanded_values_per_token_per_layer"] == 4 * (24 + 16)
    if name == "v2-lite":
        doc = _ids(capsys, "inspect", ckpt, "--json")
        assert [(p["name"], p["rewrites"]) for p in doc["passes"]][-1] == ("absorb_mla", 3)
        assert doc["ops"]["dsmoe::mla_attention"] == 3 and all(p["rel_err"] <= 1e-4 for p in doc["passes"])
    for backend in ("eager", "fused"):
        got = _ids(capsys, "generate", ckpt, "--prompt-ids", prompt, "--max-new-tokens", NEW, "--backend", backend, "--json")
        assert got["ids"] == want, backend
    out = tmp_path / "export"
    flags = [] if absorbed else ["--no-absorb-mla"]
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--target", target, "--verify", *flags, entry=export_main)
    assert code == 0 and "verified" in err, err
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["passed"] and report["kv_cache_layout"]["entries"] == ["latent"]
    assert ("dsmoe::mla_attention" in report["lowering"]["lowered"]) == absorbed
    assert ("absorb_mla" in [p["name"] for p in report["passes"]]) == absorbed
    got = _ids(capsys, "generate", out, "--prompt-ids", prompt, "--max-new-tokens", NEW, "--backend", "ort", "--json")
    assert got["ids"] == want
    _check_latent_io(out)


def _check_latent_io(out):
    """The exported cache is the latent: past_key_values.{i}.latent [batch, 1, past_sequence, 40]."""
    model = onnx.load(str(out / "model.onnx"))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    ins = {i.name: dims(i) for i in model.graph.input}
    outs = {o.name: dims(o) for o in model.graph.output}
    assert [n for n in ins if n.startswith("past")] == [f"past_key_values.{i}.latent" for i in range(3)]
    assert [n for n in outs if n.startswith("present")] == [f"present.{i}.latent" for i in range(3)]
    assert ins["past_key_values.0.latent"] == ["batch", 1, "past_sequence", 40]
    assert outs["present.2.latent"] == ["batch", 1, "total_sequence", 40]
    assert OrtDecoder(out).layout.names == ("latent",)


def test_mla_preset_exports_and_generates(tmp_path):
    """The fast loop's MLA export: absorbed attention, latent cache I/O, verified, ORT tokens = eager."""
    over = {"num_hidden_layers": 2}
    report = export_model("preset:mla-tiny", out=str(tmp_path / "e"), verify=True, overrides=over)
    assert report["verification"]["passed"] and report["inputs"][3:] == ["past_key_values.0.latent", "past_key_values.1.latent"]
    assert report["lowering"]["lowered"]["dsmoe::mla_attention"] == {
        "standard ops (absorbed: latent cache, MatMul per head group)": 2}
    model = dsmoe.load("preset:mla-tiny", overrides=over)
    assert generate_ort(tmp_path / "e", [1, 5, 9], 8) == greedy_generate(eager_step(model), model.config, [1, 5, 9], 8)
