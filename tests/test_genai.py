"""Exports that ONNX Runtime GenAI runs as they are: ``genai_config.json``, the static-cache mode,
tokenizer files, ``dsmoe generate --backend genai``, batches of unequal prompts.

One tiny checkpoint with tokenizer files (a byte-level BPE over the 256-token vocabulary, a
``generation_config.json``) is exported once per cache mode; GenAI loads each directory with no
edits. The reference is always the eager model's greedy decoding.
"""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch
from conftest import run_cli

import dsmoe
from dsmoe.checkpoint import save_checkpoint
from dsmoe.app.generate import eager_step, greedy_generate, greedy_generate_batch
from dsmoe.errors import DsmoeError
from dsmoe.export import OrtDecoder, export_model
from dsmoe.export.genai_config import GENAI_CONFIG, check_genai_config, genai_config, special_token_ids
from dsmoe.export.genai_runner import GenaiModel, require_genai
from dsmoe.ir import sample_inputs

og = pytest.importorskip("onnxruntime_genai")

PROMPT = [1, 5, 9, 17, 33]
BATCH = [[1, 5, 9, 17, 33, 40, 41], [7, 8, 100], [3, 200, 11, 12]]
N = 10


def _tokenizer_files(d):
    """A byte-level BPE whose 256 ids are the tiny vocabulary, the files a HF checkpoint ships."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox"], trainer)
    assert tok.get_vocab_size() == 256
    tok.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "!", "eos_token": '"'}))
    # generation_config.json wins over config.json (which says bos 1, eos 2): pad 3 comes from here
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(dsmoe.load("preset:tiny"), d)
    _tokenizer_files(d)
    return d


@pytest.fixture(scope="module")
def eager():
    return dsmoe.load("preset:tiny")


@pytest.fixture(scope="module", params=["dynamic", pytest.param("static", marks=pytest.mark.slow)])
def exported(request, ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("genai") / request.param
    report = export_model(str(ckpt), out=str(out), kv_cache=request.param, verify=True)
    return out, report


def test_export_writes_genai_config_and_tokenizer_files(exported):
    out, report = exported
    assert report["verification"]["passed"] and report["verification"]["kv_cache"] == report["kv_cache"]
    assert report["verification"]["genai_config"] == []
    names = {p.name for p in out.iterdir()}
    assert {GENAI_CONFIG, "tokenizer.json", "special_tokens_map.json", "generation_config.json",
            "tokenizer_config.json"} <= names  # tokenizer_config.json: written, the checkpoint has none
    doc = json.loads((out / GENAI_CONFIG).read_text())
    m, dec = doc["model"], doc["model"]["decoder"]
    c = dsmoe.load_config("preset:tiny")
    assert m["type"] == "decoder" and (m["bos_token_id"], m["eos_token_id"], m["pad_token_id"]) == (1, 2, 3)
    assert (dec["head_size"], dec["hidden_size"], dec["num_attention_heads"], dec["num_key_value_heads"],
            dec["num_hidden_layers"]) == (c.head_dim, c.hidden_size, c.num_attention_heads,
                                          c.num_key_value_heads, c.num_hidden_layers)
    assert m["context_length"] == c.max_position_embeddings and m["vocab_size"] == c.vocab_size
    assert doc["search"]["past_present_share_buffer"] == (report["kv_cache"] == "static")
    assert not doc["search"]["do_sample"] and doc["search"]["num_beams"] == 1
    assert dec["session_options"]["session.intra_op.allow_spinning"] == "0"


def test_config_round_trips_and_a_wrong_name_is_found(exported, tmp_path):
    out, _ = exported
    assert check_genai_config(out) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("model.onnx", "config.json"):
        (bad / f).symlink_to(out / f)
    doc = json.loads((out / GENAI_CONFIG).read_text())
    doc["model"]["decoder"]["outputs"]["present_key_names"] = "present_key.%d"
    doc["search"]["past_present_share_buffer"] = not doc["search"]["past_present_share_buffer"]
    (bad / GENAI_CONFIG).write_text(json.dumps(doc))
    problems = check_genai_config(bad)
    assert any("'present_key.0' is not a model output" in p for p in problems)
    assert any("past_present_share_buffer" in p for p in problems)


def test_genai_runs_the_export_as_is_and_matches_eager(exported, eager):
    out, _ = exported
    want = greedy_generate(eager_step(eager), eager.config, PROMPT, N)
    assert 2 not in want  # no eos: GenAI's search would stop there
    model = GenaiModel(out)
    assert model.share_buffer == (exported[1]["kv_cache"] == "static")
    assert model.generate([PROMPT], N) == [want]


def test_static_cache_equals_dynamic_and_eager(exported, eager):
    """OrtDecoder runs either mode behind the step signature; in the static one the buffers are
    bound in place (the returned present is a view of them, growing by one slot per step)."""
    out, report = exported
    dec = OrtDecoder(out, optimize=False)
    assert dec.kv_cache == report["kv_cache"]
    for batch, seq, past in [(1, 1, 0), (2, 5, 0), (2, 1, 7), (3, 4, 3), (1, 2, 70)]:
        args = sample_inputs(eager.config, batch=batch, seq=seq, past=past, seed=batch + seq + past)
        with torch.no_grad():
            ref, ref_present = eager(*args, use_cache=True)
        got, present = dec(*args)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        for (rk, rv), (k, v) in zip(ref_present, present):
            assert k.shape == rk.shape and torch.allclose(k, rk, atol=1e-5) and torch.allclose(v, rv, atol=1e-5)
    # 70 new tokens: a static decoder's buffers grow past 64 slots mid-sequence (carried over)
    long = greedy_generate(eager_step(eager), eager.config, PROMPT, 70)
    dec = OrtDecoder(out, optimize=False)
    assert greedy_generate(dec, eager.config, PROMPT, 70) == long
    if dec.kv_cache == "static":
        assert dec._bufs[0].shape[2] == 128 and dec._views[0].data_ptr() == dec._bufs[0].ctypes.data


def test_batches_of_unequal_prompts(exported, eager):
    """Each prompt's own tokens: dsmoe's loop left-pads (eager and ORT), GenAI right-pads (what it
    detects on the CPU)."""
    out, _ = exported
    want = [greedy_generate(eager_step(eager), eager.config, p, N) for p in BATCH]
    assert greedy_generate_batch(eager_step(eager), eager.config, BATCH, N) == want
    assert greedy_generate_batch(OrtDecoder(out), eager.config, BATCH, N) == want
    model = GenaiModel(out)
    assert model.generate(BATCH, N) == want
    with pytest.raises(DsmoeError, match="ends with the pad id 3"):
        model.generate([[5, 3], [7, 8, 9]], N)


def test_genai_tokenizer_loads_the_copied_files(exported, ckpt):
    from tokenizers import Tokenizer

    out, _ = exported
    tok = GenaiModel(out).tokenizer()
    text = "the quick brown fox"
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids
    assert list(tok.encode(text)) == ids and tok.decode(np.array(ids, dtype=np.int32)) == text


def test_generate_cli_genai_backend(exported, eager, capsys):
    out, _ = exported
    want = greedy_generate(eager_step(eager), eager.config, PROMPT, N)
    code, stdout, _ = run_cli(capsys, "generate", out, "--backend", "genai", "--prompt-ids", " ".join(map(str, PROMPT)),
                              "--max-new-tokens", N, "--json")
    assert code == 0 and json.loads(stdout)["ids"] == want
    code, stdout, _ = run_cli(capsys, "generate", out, "--backend", "genai", "--prompt-ids", "7 8 100",
                              "--prompt-ids", "3 200 11 12", "--max-new-tokens", N)
    assert code == 0 and stdout.strip().splitlines() == [" ".join(map(str, w)) for w in
                                                         [greedy_generate(eager_step(eager), eager.config, p, N)
                                                          for p in BATCH[1:]]]
    code, stdout, _ = run_cli(capsys, "generate", out, "--backend", "genai", "--prompt", "the fox",
                              "--max-new-tokens", 4, "--json")
    assert code == 0 and len(json.loads(stdout)["ids"]) <= 4 and "text" in json.loads(stdout)


# ---- fast: nothing exported ---------------------------------------------------------------------

def test_missing_genai_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    real = builtins.__import__

    def no_genai(name, *a, **k):
        if name == "onnxruntime_genai":
            raise ImportError("No module named 'onnxruntime_genai'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_genai)
    with pytest.raises(DsmoeError, match="pip install 'dsmoe\\[genai\\]'"):
        require_genai()
    (tmp_path / "model.onnx").write_bytes(b"")
    code, _, err = run_cli(capsys, "generate", tmp_path, "--backend", "genai", "--prompt-ids", "1 2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "onnxruntime-genai" in err


def test_special_token_ids_are_checked(tmp_path):
    c = dsmoe.load_config("preset:tiny")
    assert special_token_ids(c, "preset:tiny") == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert special_token_ids(c, str(tmp_path))["pad_token_id"] == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 999}))
    with pytest.raises(DsmoeError, match="eos_token_id 999 is not a token id"):
        special_token_ids(c, str(tmp_path))
    with pytest.raises(DsmoeError, match="unknown --kv-cache"):
        genai_config(c, kv_cache="paged", tokens={})
