"""Issue 21, classes 5 and 8: every option validated (out of range, needing another option, unused
by the suite or backend), refused in one line before any work; usage errors one line too."""

from __future__ import annotations

import json

import pytest
from conftest import one_line as _one_line
from safetensors import safe_open

from dsmoe.config import DeepseekConfig

TINY = "preset:tiny"


def one_line(code, err, want_code, *needles):
    _one_line(code, err, want_code, *needles, error_prefix=True)  # every refusal here is an `error: ` line


@pytest.mark.parametrize("argv, needle", [
    (["init", "{tmp}/c", "--preset", "tiny", "--seed", "-1"], "--seed"),
    (["init", "{tmp}/c", "--preset", "tiny", "--seed", str(2**64)], "--seed"),
    (["init", "{tmp}/c", "--preset", "tiny", "--set", "vocab_size=1"], "bos_token_id"),
    (["experts", TINY, "--random", "0"], "--random"),
    (["experts", TINY, "--random", "1", "--seq-len", "0"], "--seq-len"),
    (["experts", TINY, "--random", "1", "--seq-len", "100000"], "positions"),
    (["experts", TINY, "--random", "1", "--seed", "-3"], "--seed"),
    (["experts", TINY, "--prompt-ids", "1 2", "--seq-len", "8"], "apply to --random N only"),
    (["experts", TINY, "--prompt-ids", "1 2", "--seed", "1"], "apply to --random N only"),
    (["experts", TINY, "--prompt-ids", "1 2", "--compare-backend", "eager"], "apply to --compare OTHER only"),
    (["experts", TINY, "--prompt-file", "{tmp}"], "is a directory"),
    (["experts", TINY, "--random", "1", "--top-pairs", "-1"], "--top-pairs"),
    (["experts", TINY, "--random", "1", "--place", "0"], "--place"),
    (["generate", TINY, "--prompt-ids", "1", "--fold-shared-experts"], "apply to --backend fused only"),
    (["generate", TINY, "--prompt-ids", "1", "--no-absorb-mla"], "apply to --backend fused only"),
    (["generate", TINY, "--prompt-ids", "1", "--backend", "fused", "--no-absorb-mla"], "MLA models"),
    (["generate", TINY, "--prompt-ids", "1", "--no-cuda-graph"], "--no-cuda-graph needs --backend fused"),
    (["generate", TINY, "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "--suite", "moe-layer", "--threads", "0", "--out", "{tmp}/b"], "--threads"),
    (["bench", "--suite", "quant-full", "--quick", "--preset", "tiny", "--out", "{tmp}/b"], "--quick, --preset"),
    (["export", TINY, "--out", "{tmp}/e", "--target", "tensorrt", "--arch", " , "], "--arch names no GPU"),
    (["export", TINY, "--out", "{tmp}/e", "--target", "tensorrt", "--max-batch", "0"], "max batch >= 1"),
    (["export", TINY, "--out", "{tmp}/e", "--no-absorb-mla"], "MLA models"),
    (["inspect", TINY, "--no-absorb-mla"], "MLA models"),
    (["build-kernels", "--arch", ",", "--out", "{tmp}/k"], "--arch names no GPU"),
    (["generate", TINY, "--bogus"], "No such option"),
    (["info"], "Missing argument"),
])
def test_class5_options_are_validated_before_any_work(run, tmp_path, argv, needle):
    code, out, err = run(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    one_line(code, err, 2, needle)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == []


def test_class5_init_writes_only_what_dsmoe_loads(run, tmp_path):
    """Whatever init writes reads back under the loader's contract (config, keys, shapes)."""
    out = tmp_path / "c"
    code, _, err = run("init", out, "--preset", "tiny", "--set", "num_hidden_layers=2", "--set", "tie_word_embeddings=true",
                       "--seed", str(2**64 - 1))
    assert code == 0, err
    cfg = DeepseekConfig.from_json(out / "config.json")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and cfg.tie_word_embeddings  # noqa: SIM118
    assert json.loads((out / ".dsmoe-output.json").read_text())["files"] == ["config.json", "model.safetensors"]
