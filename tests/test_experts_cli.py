"""``dsmoe experts`` through the CLI: the report, the plot, the comparison and the placement on a
preset and a checkpoint directory, prompts from a file, and every bad input as one line, exit 2."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.fixture
def run(capsys):
    return lambda *argv: run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoint directories: the tiny preset (seed 0), one with 16 experts, one with 4 layers."""
    from dsmoe.app.cli import main

    root = tmp_path_factory.mktemp("experts")
    for name, extra in (("tiny", []), ("e16", ["--set", "n_routed_experts=16"]), ("l4", ["--set", "num_hidden_layers=4"])):
        try:
            main(["init", str(root / name), "--preset", "tiny", *extra])
        except SystemExit as e:
            assert e.code in (0, None)
    return root


def test_report_plot_and_placement_on_a_checkpoint(ckpts, tmp_path, run):
    png = tmp_path / "plots" / "load.png"
    code, out, err = run("experts", ckpts / "tiny", "--random", "3", "--seq-len", "16", "--place", "2", "--plot", png,
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["backend"], doc["prompts"], doc["tokens"], doc["experts"], doc["top_k"]) == ("eager", 3, 48, 8, 2)
    assert [s["layer"] for s in doc["layers"]] == [1, 2] and all(sum(s["counts"]) == 96 for s in doc["layers"])
    p = doc["placement"]
    assert p["devices"] == 2 and p["capacities"] == [4, 4] and len(p["layers"]) == 2
    assert all(s["max_over_mean"] <= s["contiguous_max_over_mean"] for s in p["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert doc["plot"] == {"path": str(png), "bytes": png.stat().st_size}
    # the preset with the same seed is the same model: the same counts
    _, out2, _ = run("experts", "preset:tiny", "--random", "3", "--seq-len", "16", "--json")
    assert [s["counts"] for s in json.loads(out2)["layers"]] == [s["counts"] for s in doc["layers"]]


def test_table_output(run):
    code, out, err = run("experts", "preset:tiny", "--prompt-ids", "1 2 3 4 5 6", "--place", "4",
                         "--compare", "preset:tiny", "--compare-backend", "fused")
    assert code == 0, err
    for text in ("expert load: preset:tiny (eager), 6 tokens", "max/mean", "shared share", "busiest",
                 "routing drift: preset:tiny (eager, float32) vs", "(fused,", "placement on 4 devices", "greedy LPT"):
        assert text in out, text


def test_compare_with_itself_is_zero_drift(ckpts, run):
    code, out, err = run("experts", ckpts / "tiny", "--random", "2", "--seq-len", "8", "--compare", ckpts / "tiny",
                         "--json")
    assert code == 0, err
    c = json.loads(out)["compare"]
    assert [(s["changed"], s["overlap"], s["top1_changed"]) for s in c["layers"]] == [(0.0, 1.0, 0.0)] * 2


def test_prompt_file_of_ids_and_of_text(ckpts, tmp_path, run):
    f = tmp_path / "prompts.txt"
    f.write_text("1 2 3\n\n4 5\n")
    code, out, err = run("experts", ckpts / "tiny", "--prompt-file", f, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["prompts"] == 2 and doc["tokens"] == 5

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    src = tmp_path / "with_tok"
    src.mkdir()
    for p in (ckpts / "tiny").iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    tok.save(str(src / "tokenizer.json"))
    f.write_text("w1 w2 w3\nw4 w5\n")
    code, out, err = run("experts", src, "--prompt-file", f, "--json")
    assert code == 0, err
    assert [s["counts"] for s in json.loads(out)["layers"]] == [s["counts"] for s in doc["layers"]]


@pytest.mark.parametrize("argv,message", [
    (["--prompt-ids", "1 2 999"], "token id 999 is outside the vocabulary [0, 256)"),
    (["--prompt-ids", "1 x"], "--prompt-ids must be integers"),
    (["--prompt-ids", " "], "prompt 1 is empty"),
    (["--prompt-ids", "1", "--random", "2"], "exactly one of --prompt-ids, --prompt-file or --random"),
    ([], "exactly one of"),
    (["--random", "0"], "--random and --seq-len must be at least 1"),
    (["--prompt-file", "{tmp}/empty.txt"], "holds no prompts"),
    (["--prompt-file", "{tmp}/missing.txt"], "does not exist"),
    (["--prompt-file", "{tmp}/bad.txt"], "bad.txt:2"),
    (["--random", "1", "--set", "first_k_dense_replace=3"], "has no MoE layers"),
    (["--random", "1", "--place", "0"], "--place needs a positive number"),
    (["--random", "1", "--place", "9"], "--place needs 1 <= N <= 8"),
    (["--random", "1", "--plot", "{tmp}/load.jpg"], "--plot writes a PNG"),
    (["--random", "1", "--backend", "ort"], "the ort backend runs an export made with --router-stats"),
    (["--random", "1", "--compare", "{ckpts}/e16"], "routed experts 8 vs 16"),
    (["--random", "1", "--compare", "{ckpts}/l4"], "MoE layers [1, 2] vs [1, 2, 3]"),
    (["--random", "1", "--compare", "{tmp}/nowhere"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(ckpts, tmp_path, run, argv, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.txt").write_text("1 2\n3 four\n")
    code, out, err = run("experts", ckpts / "tiny", *[a.format(tmp=tmp_path, ckpts=ckpts) for a in argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (code, out, err)
    assert "Traceback" not in err


def test_generate_router_stats_out_and_errors(ckpts, tmp_path, run):
    path = tmp_path / "gen.json"
    code, out, err = run("generate", ckpts / "tiny", "--prompt-ids", "1 2 3", "--max-new-tokens", "3",
                         "--router-stats", "--router-stats-out", path)
    assert code == 0, err
    assert len(out.split()) == 3 and "expert load" in err          # ids on stdout, the report on stderr
    doc = json.loads(path.read_text())
    assert doc["tokens"] == 3 + 3 - 1 and doc["calls"] == 3 and [s["layer"] for s in doc["layers"]] == [1, 2]
    code, _, err = run("generate", "preset:tiny", "--prompt-ids", "1", "--router-stats",
                       "--set", "first_k_dense_replace=3")
    assert code == 2 and "has no MoE layers" in err and len(err.strip().splitlines()) == 1
