"""``dsmoe eval``: perplexity, bits per byte and KL divergence, on every backend.

The reference is computed here, independently of :mod:`dsmoe.app.evaluate`: the eager model's logits
on the same windows (llama.cpp's convention: a window of ctx tokens scores the predictions after
its first ctx//2), torch's cross-entropy and KL divergence. One tiny checkpoint with a byte-level
BPE tokenizer is exported once (ONNX Runtime, GenAI); llama.cpp's ``llama-perplexity`` on the
F32 GGUF of the same weights is the external peer (skipped where llama.cpp is not built).
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

import dsmoe
from dsmoe.checkpoint import save_checkpoint
from dsmoe.app.evaluate.run import run_eval
from dsmoe.export import export_model

CTX = 32
TEXT = (Path(__file__).parents[1] / "dsmoe" / "model.py").read_text()[:1000]  # English and Python, a few non-ASCII


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted: a byte-level token's characters → its bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


VOCAB = 300  # the 256 bytes and some merges (llama.cpp refuses a BPE vocabulary without merges)


def _tokenizer(d: Path, vocab: int = VOCAB, text: str = TEXT) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.save(str(d / "tokenizer.json"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "text.txt").write_text(TEXT)
    ckpt = root / "tiny"
    save_checkpoint(dsmoe.load("preset:tiny", seed=0, overrides={"vocab_size": VOCAB}), ckpt)
    _tokenizer(ckpt)
    other = root / "tiny-seed1"
    save_checkpoint(dsmoe.load("preset:tiny", seed=1, overrides={"vocab_size": VOCAB}), other)
    _tokenizer(other)
    return root, ckpt, other


@pytest.fixture(scope="module")
def exported(files):
    root, ckpt, _ = files
    out = root / "tiny-ort"
    export_model(str(ckpt), out=str(out))
    return out


def _windows(tokens, ctx):
    first = ctx // 2
    return [(w, tokens[w:w + ctx]) for w in range(0, len(tokens) - ctx + 1, ctx)], first


BYTES = _byte_decoder()


@functools.lru_cache
def _reference(ckpt: Path, text: str, ctx: int, baseline: Path | None = None):
    """PPL, bits/byte and mean KLD computed directly: eager logits, torch cross-entropy / kl_div."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokens = tok.encode(text, add_special_tokens=False).ids
    model = dsmoe.load(str(ckpt), dtype="float32")
    base = dsmoe.load(str(baseline), dtype="float32") if baseline else None
    windows, first = _windows(tokens, ctx)
    nll, nbytes, kld = [], 0, []
    with torch.no_grad():
        for _, ids in windows:
            x = torch.tensor([ids])
            logits = model(x)[0, first:ctx - 1].double()
            y = x[0, first + 1:]
            nll.append(torch.nn.functional.cross_entropy(logits, y, reduction="none"))
            nbytes += sum(len(tok.id_to_token(t)) for t in y.tolist())  # one character per byte
            assert all(c in BYTES for t in y.tolist() for c in tok.id_to_token(t))
            if base is not None:
                b = torch.log_softmax(base(x)[0, first:ctx - 1].double(), -1)
                kld.append(torch.nn.functional.kl_div(torch.log_softmax(logits, -1), b, log_target=True,
                                                      reduction="none").sum(-1))
    nll = torch.cat(nll)
    out = {"ppl": math.exp(nll.mean().item()), "bpb": nll.sum().item() / math.log(2) / nbytes, "tokens": len(nll)}
    if kld:
        out["kld"] = torch.cat(kld).mean().item()
    return out


@pytest.fixture(scope="module")
def vs_other(files):
    root, ckpt, other = files
    return run_eval(source=str(ckpt), text=[str(root / "text.txt")], ctx=CTX, baseline=str(other), progress=False)


def test_eager_ppl_bits_per_byte_and_self_kld_match_a_direct_computation(files):
    root, ckpt, _ = files
    ref = _reference(ckpt, TEXT, CTX)
    r = run_eval(source=str(ckpt), text=[str(root / "text.txt")], ctx=CTX, baseline=str(ckpt), progress=False)
    assert r["tokens"] == ref["tokens"] == r["windows"] * (CTX - 1 - CTX // 2)
    assert r["ppl"] == pytest.approx(ref["ppl"], rel=1e-9)
    assert r["bits_per_byte"] == pytest.approx(ref["bpb"], rel=1e-9)
    assert 100 < r["ppl"] < 500  # a random model over 300 tokens: about ln 300 nats
    b = r["baseline"]  # the model against itself
    assert b["kld_mean"] == 0 and b["ppl_ratio"] == 1 and b["same_top1"] == 1 and b["dp_rms"] == 0


def test_kld_against_another_model_matches_torch(files, vs_other):
    _, ckpt, other = files
    ref = _reference(ckpt, TEXT, CTX, baseline=other)
    assert vs_other["baseline"]["kld_mean"] == pytest.approx(ref["kld"], rel=1e-9)
    assert vs_other["baseline"]["kld_mean"] > 0.01 and vs_other["baseline"]["same_top1"] < 1


@pytest.mark.parametrize("backend", ["fused", "ort", "genai"])
def test_every_backend_scores_like_eager(files, exported, backend):
    if backend == "genai":
        pytest.importorskip("onnxruntime_genai")
    root, ckpt, _ = files
    src = str(exported) if backend in ("ort", "genai") else str(ckpt)
    r = run_eval(source=src, text=[str(root / "text.txt")], ctx=CTX, backend=backend, baseline=str(ckpt), progress=False)
    ref = _reference(ckpt, TEXT, CTX)
    assert r["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert r["baseline"]["kld_mean"] < 1e-9 and r["baseline"]["same_top1"] == 1


def test_saved_logits_are_reused_as_the_baseline(files, vs_other, tmp_path, capsys):
    root, ckpt, other = files
    saved = tmp_path / "base.safetensors"
    code, _, err = run_cli(capsys, "eval", other, "--text", root / "text.txt", "--ctx", CTX, "--save-logits", saved,
                           "--no-progress")
    assert code == 0, err
    live = vs_other
    reused = run_eval(source=str(ckpt), text=[str(root / "text.txt")], ctx=CTX, baseline_logits=str(saved), progress=False)
    assert reused["baseline"]["kld_mean"] == pytest.approx(live["baseline"]["kld_mean"], rel=1e-3, abs=1e-6)
    assert reused["baseline"]["ppl"] == pytest.approx(live["baseline"]["ppl"], rel=1e-3)
    # fp16 may flip a near-tie of this random model's flat distributions: one token or two
    assert reused["baseline"]["same_top1"] == pytest.approx(live["baseline"]["same_top1"], abs=2.5 / live["tokens"])
    code, _, err = run_cli(capsys, "eval", ckpt, "--text", root / "text.txt", "--ctx", CTX, "--save-logits", saved)
    assert code == 2 and "exists" in err  # never overwritten without --force


def _one_line_exit_2(capsys, *argv, match):
    code, out, err = run_cli(capsys, "eval", *argv, "--no-progress")
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error:") and re.search(match, err), err


def test_bad_input_is_one_line_exit_2(files, tmp_path, capsys):
    root, ckpt, _ = files
    text = root / "text.txt"
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "short.txt").write_text("def f(x):\n")
    _one_line_exit_2(capsys, ckpt, "--text", tmp_path / "empty.txt", match="empty")
    _one_line_exit_2(capsys, ckpt, "--text", tmp_path / "short.txt", "--ctx", CTX, match="shorter than one window")
    _one_line_exit_2(capsys, ckpt, "--text", text, "--ctx", CTX, "--stride", 3, match="--stride")
    no_tok = tmp_path / "no-tok"
    shutil.copytree(ckpt, no_tok)
    (no_tok / "tokenizer.json").unlink()
    _one_line_exit_2(capsys, no_tok, "--text", text, match="no tokenizer.json")
    other_vocab = tmp_path / "vocab320"
    save_checkpoint(dsmoe.load("preset:tiny", overrides={"vocab_size": 320}), other_vocab)
    _tokenizer(other_vocab, vocab=320)
    _one_line_exit_2(capsys, ckpt, "--text", text, "--ctx", CTX, "--baseline", other_vocab, match="another vocabulary")
    saved = tmp_path / "l.safetensors"
    run_cli(capsys, "eval", ckpt, "--text", text, "--ctx", CTX, "--save-logits", saved, "--no-progress")
    _one_line_exit_2(capsys, ckpt, "--text", text, "--ctx", 2 * CTX, "--baseline-logits", saved, match="--ctx")
    _one_line_exit_2(capsys, ckpt, "--text", text, "--ctx", CTX, "--baseline-logits", text, match="cannot read|not a dsmoe")


def _llama_perplexity() -> str | None:
    """``$DSMOE_LLAMA_BIN/llama-perplexity``, the repo's build folder (benchmarks/README.md), or PATH."""
    from dsmoe.bench.llama_cpp import BUILD_BIN

    for d in (os.environ.get("DSMOE_LLAMA_BIN"), BUILD_BIN):
        if d and (Path(d) / "llama-perplexity").is_file():
            return str(Path(d) / "llama-perplexity")
    return shutil.which("llama-perplexity")


LLAMA_PPL = _llama_perplexity()


@pytest.mark.skipif(LLAMA_PPL is None, reason="llama.cpp's llama-perplexity is not built (CI)")
def test_llama_perplexity_on_the_f32_gguf_agrees(files, tmp_path):
    pytest.importorskip("gguf")
    from dsmoe.bench.gguf_export import write_gguf

    root, ckpt, _ = files
    gguf = tmp_path / "tiny-f32.gguf"
    write_gguf(str(ckpt), gguf, qtype="F32")
    run = subprocess.run([LLAMA_PPL, "-m", str(gguf), "-f", str(root / "text.txt"), "-c", str(CTX), "-b", str(CTX),
                          "-t", "1"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
    ours = run_eval(source=str(ckpt), text=[str(root / "text.txt")], ctx=CTX, progress=False)
    assert m and float(m.group(1)) == pytest.approx(ours["ppl"], rel=5e-3)


def test_training_script_runs_a_few_steps(tmp_path):
    from dsmoe.train.loop import TrainOptions, train

    o = TrainOptions(steps=3, batch=2, seq_len=32, vocab_size=300, bytes_scale=0.003, warmup=1, log_every=1,
                     checkpoint_every=2, overrides=dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                                        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                                                        num_experts_per_tok=2, n_shared_experts=1))
    last = train(out=tmp_path / "mm", options=o, log_path=tmp_path / "log.jsonl")
    assert last["step"] == 2 and np.isfinite(last["ce"]) and 0 < last["aux"] < 10
    files = {p.name for p in (tmp_path / "mm").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_log.jsonl"} <= files
    model = dsmoe.load(str(tmp_path / "mm"))
    assert model.config.vocab_size == 300 and model.config.first_k_dense_replace == 1


# ---- dsmoe-export --quant … --eval-text: the export report's quality on text ----------------------

def test_export_eval_text_reports_what_dsmoe_eval_measures(files, tmp_path, capsys):
    """The report's quality block (export vs source on held-out text) equals ``dsmoe eval EXPORT
    --baseline SOURCE`` run afterwards on the committed export; the digests still hold."""
    import json

    from dsmoe.app.cli import export_main
    from dsmoe.export.files import verify_export_files

    root, ckpt, _ = files
    text, out = root / "text.txt", tmp_path / "q8"
    code, _, printed = run_cli(capsys, ckpt, "--out", out, "--quant", "int8", "--eval-text", text, "--eval-ctx", CTX,
                               entry=export_main)
    assert code == 0, printed
    report = json.loads((out / "export_report.json").read_text())
    q = report["quality"]
    assert verify_export_files(out) is True
    code, got, err = run_cli(capsys, "eval", out, "--baseline", ckpt, "--text", text, "--ctx", CTX, "--json", "--no-progress")
    assert code == 0, err
    r = json.loads(got)
    b = r["baseline"]
    assert q["ppl_ratio"] == pytest.approx(b["ppl_ratio"], rel=1e-9) and q["ppl"] == pytest.approx(r["ppl"], rel=1e-9)
    assert q["kld_mean"] == pytest.approx(b["kld_mean"], rel=1e-9) and q["same_top1"] == pytest.approx(b["same_top1"])
    assert q["kld_p99"] == pytest.approx(b["kld_percentiles"]["99"], rel=1e-9)
    assert q["tokens_scored"] == r["tokens"] and q["ctx"] == CTX
    assert q["baseline_ppl"] == pytest.approx(_reference(ckpt, TEXT, CTX)["ppl"], rel=1e-6)  # the source, eager fp32
    assert q["text_files"] == [{"name": "text.txt", "bytes": text.stat().st_size}]
    assert q["ppl_ratio"] != 1.0 and 0 < q["kld_mean"] < 0.1  # int8 moved the logits, a little
    assert f"(ratio {q['ppl_ratio']:.5f}), mean KLD {q['kld_mean']:.6f}" in " ".join(printed.split())  # the summary


def test_export_eval_text_refusals_are_one_line_exit_2(files, tmp_path, capsys):
    from dsmoe.app.cli import export_main

    root, ckpt, _ = files
    text = root / "text.txt"
    (tmp_path / "short.txt").write_text("def f(x):\n")
    for argv, match in [((ckpt, "--eval-text", text), "only with --quant"),
                        (("preset:tiny", "--quant", "int8", "--eval-text", text), "tokenizer.json"),
                        ((ckpt, "--quant", "int8", "--eval-text", tmp_path / "short.txt", "--eval-ctx", CTX),
                         "shorter than one window of --eval-ctx"),
                        ((ckpt, "--quant", "int8", "--eval-ctx", CTX), "--eval-ctx applies only with --eval-text")]:
        code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "x", entry=export_main)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and re.search(match, err), (argv, err)
        assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]  # nothing half-written, no claim left behind
