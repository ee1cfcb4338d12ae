"""Checkpoint I/O: round trips, both expert layouts, shards, and every error naming its problem."""

import json

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.checkpoint import save_checkpoint
from dsmoe.errors import CheckpointError, DsmoeError

IDS = torch.tensor([[1, 7, 3, 250, 9, 11]])


def assert_same_model(a, b):
    """Weights bit-identical; logits equal up to BLAS paths that depend on memory alignment."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    torch.testing.assert_close(a(IDS), b(IDS), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def model():
    return tiny("v3-noaux-tc")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "single")


def test_round_trip_is_exact(model, saved):
    assert_same_model(dsmoe.load(saved), model)


def test_sharded_equals_single(model, saved, tmp_path):
    sharded = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert_same_model(dsmoe.load(sharded), dsmoe.load(saved))


def test_stacked_v5_layout_loads_to_the_same_logits(model, saved, tmp_path):
    sd = load_file(str(saved / "model.safetensors"))
    E = model.config.n_routed_experts
    for i in model.config.moe_layers:
        p = f"model.layers.{i}.mlp.experts"
        sd[f"{p}.gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{p}.{j}.gate_proj.weight"),
                                                          sd.pop(f"{p}.{j}.up_proj.weight")]) for j in range(E)])
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{j}.down_proj.weight") for j in range(E)])
    out = tmp_path / "stacked"
    out.mkdir()
    (out / "config.json").write_text((saved / "config.json").read_text())
    save_file(sd, str(out / "model.safetensors"))
    assert_same_model(dsmoe.load(out), model)


def test_dtype_cast_on_load_keeps_routing_bias_fp32(saved):
    m = dsmoe.load(saved, dtype="bfloat16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_bf16_checkpoint_written_and_read(model, tmp_path):
    out = save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert dsmoe.load(out).lm_head.weight.dtype == torch.bfloat16


def test_rotary_buffer_in_checkpoint_is_ignored(model, saved, tmp_path):
    sd = load_file(str(saved / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _write(tmp_path, saved, sd)
    assert_same_model(dsmoe.load(tmp_path), model)


def _write(dst, saved, sd, config=None):
    (dst / "config.json").write_text(config or (saved / "config.json").read_text())
    save_file(sd, str(dst / "model.safetensors"))


def test_missing_key(saved, tmp_path):
    sd = load_file(str(saved / "model.safetensors"))
    sd.pop("model.layers.2.mlp.experts.5.up_proj.weight")
    _write(tmp_path, saved, sd)
    with pytest.raises(CheckpointError, match=r"missing key model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        dsmoe.load(tmp_path)


def test_unexpected_key(saved, tmp_path):
    sd = load_file(str(saved / "model.safetensors"))
    sd["model.layers.9.mlp.gate.weight"] = torch.zeros(8, 64)
    _write(tmp_path, saved, sd)
    with pytest.raises(CheckpointError, match=r"unexpected key model\.layers\.9\.mlp\.gate\.weight.*config/weights mismatch"):
        dsmoe.load(tmp_path)


def test_wrong_shape_names_expected_and_found(saved, tmp_path):
    sd = load_file(str(saved / "model.safetensors"))
    sd["model.layers.1.mlp.gate.weight"] = torch.zeros(9, 64)
    _write(tmp_path, saved, sd)
    with pytest.raises(CheckpointError, match=r"wrong shape for model\.layers\.1\.mlp\.gate\.weight: expected \[8, 64\], found \[9, 64\]"):
        dsmoe.load(tmp_path)


def test_config_weights_mismatch(saved, tmp_path):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["n_routed_experts"] = 16
    _write(tmp_path, saved, load_file(str(saved / "model.safetensors")), json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"wrong shape|missing key"):
        dsmoe.load(tmp_path)


def test_truncated_file(saved, tmp_path):
    data = (saved / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        dsmoe.load(tmp_path)


def test_pickle_only_checkpoint_is_refused(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        dsmoe.load(tmp_path)


def test_existing_output_refused_then_forced(model, saved):
    with pytest.raises(DsmoeError, match="already exists"):
        save_checkpoint(model, saved)
    save_checkpoint(model, saved, force=True)
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
