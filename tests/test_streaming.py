"""A model part by part: the layer-by-layer checkpoint writer equals init_model bit for bit, and
reading one part of a checkpoint (either expert layout) gives that part's tensors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROUTING_VARIANTS
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.config import DeepseekConfig
from dsmoe.errors import CheckpointError, DsmoeError
from dsmoe.streaming import part_names, part_shapes, random_parts, read_part, write_random_checkpoint


def _files(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("variant,tie,dtype", [("v1-softmax-greedy", False, torch.bfloat16),
                                               ("v3-noaux-tc", False, torch.float32),
                                               ("v1-norm", True, torch.float16)])
def test_layer_by_layer_checkpoint_is_init_model(tmp_path, variant, tie, dtype):
    cfg = DeepseekConfig.from_name("tiny", **ROUTING_VARIANTS[variant], tie_word_embeddings=tie)
    out = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=3, dtype=dtype, max_shard_bytes=60_000)
    want = {k: v for k, v in dsmoe.init_model(cfg, seed=3, dtype=dtype).state_dict().items()
            if not k.endswith("inv_freq") and not (tie and k == "lm_head.weight")}
    got = _files(out)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(list(out.glob("*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_one_shard_when_it_fits(tmp_path):
    out = write_random_checkpoint(dsmoe.load_config("preset:tiny"), tmp_path / "c", seed=0)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors"]
    with pytest.raises(DsmoeError, match="seed must be an integer"):
        write_random_checkpoint(dsmoe.load_config("preset:tiny"), tmp_path / "d", seed=-1)


def test_random_parts_follow_the_model_order():
    cfg = dsmoe.load_config("preset:tiny")
    parts = [p for p, _ in random_parts(cfg, 0)]
    assert parts == part_names(cfg) == ["embed", "layer 0", "layer 1", "layer 2", "head"]
    keys = [k for _, sd in random_parts(cfg, 0) for k in sd]
    assert keys == [k for k, _ in dsmoe.init_model(cfg).named_parameters()]


@pytest.mark.parametrize("stacked", [False, True])
def test_read_part(tmp_path, stacked):
    cfg = dsmoe.load_config("preset:tiny")
    model = dsmoe.init_model(cfg, seed=1)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if stacked:  # transformers v5's in-memory layout
        p = "model.layers.1.mlp.experts"
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        sd[f"{p}.gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"),
                                                          sd.pop(f"{p}.{e}.up_proj.weight")]) for e in range(E)])
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(E)])
        assert sd[f"{p}.gate_up_proj"].shape == (E, 2 * I, cfg.hidden_size)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    got = read_part(tmp_path, cfg, "layer 1")
    assert set(got) == set(part_shapes(cfg, "layer 1"))
    assert torch.equal(got["model.layers.1.mlp.experts.3.up_proj.weight"], model.model.layers[1].mlp.experts[3].up_proj.weight)
    assert set(read_part(tmp_path, cfg, "head")) == {"model.norm.weight", "lm_head.weight"}
    small = cfg.override({"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2})
    with pytest.raises(CheckpointError, match=r"wrong shape for model\.embed_tokens\.weight"):
        read_part(tmp_path, small, "embed")
