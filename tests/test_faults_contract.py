"""Issue 21, class 2: one checkpoint contract for every reader.

Every case runs through the in-memory loader (``dsmoe.load``) and the streaming exporter
(``export_model(..., stream=True)``, which refuses before writing anything); both must accept or
refuse it alike, naming the key and the shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.checkpoint import INDEX, save_checkpoint
from dsmoe.errors import CheckpointError
from dsmoe.export import export_model
from dsmoe.export.stream import check_source


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    model = dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2})
    return save_checkpoint(model, tmp_path_factory.mktemp("contract") / "tiny")


def _variant(base: Path, dst: Path, *, edit=None, config=None, shards=None) -> Path:
    """A copy of ``base`` with its tensors edited, its config edited, or split into ``shards``
    (``{file: [keys]}``; a key may go into two files)."""
    dst.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    if config:
        cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(base / "model.safetensors"))
    if edit:
        edit(sd)
    if shards is None:
        save_file(sd, str(dst / "model.safetensors"))
    else:
        for name, keys in shards.items():
            save_file({k: sd[k].clone() for k in keys}, str(dst / name))
    return dst


def _dup(sd_keys, key):
    rest = [k for k in sd_keys if k != key]
    return {"model-00001-of-00002.safetensors": [*rest[: len(rest) // 2], key],
            "model-00002-of-00002.safetensors": [*rest[len(rest) // 2:], key]}


def _cases(base: Path, tmp: Path):
    keys = sorted(load_file(str(base / "model.safetensors")))
    emb = "model.embed_tokens.weight"

    def zero_second_copy(d: Path):  # the probe's case: the copy in the later shard is all zeros
        f = d / "model-00002-of-00002.safetensors"
        sd = load_file(str(f))
        sd[emb] = torch.zeros_like(sd[emb])
        save_file(sd, str(f))
        return d

    def extra(sd):
        sd["model.layers.0.mlp.bonus.weight"] = torch.zeros(4, 4)

    def differing_head(sd):
        sd["lm_head.weight"] = sd[emb] * 2

    def wrong_shape(sd):
        sd["model.norm.weight"] = torch.ones(3)

    return {
        "key in two shards": (zero_second_copy(_variant(base, tmp / "dup", shards=_dup(keys, emb))), {},
                              "is in two shards"),
        "unexpected tensor": (_variant(base, tmp / "extra", edit=extra), {}, "unexpected key model.layers.0.mlp.bonus"),
        "fewer layers than the checkpoint": (base, {"num_hidden_layers": 1}, "unexpected key model.layers.1."),
        "tied head that differs": (_variant(base, tmp / "tied", edit=differing_head, config={"tie_word_embeddings": True}),
                                   {}, "tie_word_embeddings"),
        "missing tensor": (_variant(base, tmp / "missing", edit=lambda sd: sd.pop("model.norm.weight")), {},
                           "missing key model.norm.weight"),
        "wrong shape": (_variant(base, tmp / "shape", edit=wrong_shape), {}, "wrong shape for model.norm.weight"),
    }


def test_class2_every_reader_refuses_the_same_checkpoints(base, tmp_path):
    for name, (src, overrides, needle) in _cases(base, tmp_path).items():
        with pytest.raises(CheckpointError, match=re.escape(needle)) as loaded:
            dsmoe.load(src, overrides=overrides)
        with pytest.raises(CheckpointError, match=re.escape(needle)) as streamed:
            export_model(str(src), out=str(tmp_path / "q"), quant="int8", stream=True, overrides=overrides)
        assert str(loaded.value) == str(streamed.value), name
        assert not (tmp_path / "q").exists(), name
    # the messages name the shard the key is in
    assert "model.safetensors" in str(streamed.value)


def test_class2_a_tied_head_equal_to_the_embedding_is_accepted_by_both(base, tmp_path):
    def same_head(sd):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()

    src = _variant(base, tmp_path / "tied", edit=same_head, config={"tie_word_embeddings": True})
    model = dsmoe.load(src)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    check_source(str(src), dsmoe.load_config(src))  # the streamed export's reader: no error


def test_class2_the_index_and_the_shards_agree_in_both(base, tmp_path):
    keys = sorted(load_file(str(base / "model.safetensors")))
    shards = _dup(keys, "model.norm.weight")
    src = _variant(base, tmp_path / "idx", shards=shards)
    index = {k: name for name, ks in reversed(shards.items()) for k in ks}  # the norm: in the first shard
    (src / INDEX).write_text(json.dumps({"weight_map": index}))
    for read in (lambda: dsmoe.load(src), lambda: check_source(str(src), dsmoe.load_config(src))):
        with pytest.raises(CheckpointError, match=re.escape("model.norm.weight")):
            read()
