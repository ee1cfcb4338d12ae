"""The CLI: the README's commands work, and user errors are one line with exit code 2.

Commands run in-process through the entry point (``main(argv)``: the same parsing, error handling
and exit codes as the installed script); the installed script itself runs in a subprocess where
that is what is tested.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from dsmoe.app.cli import main


@pytest.fixture
def run(capsys):
    return lambda *argv: run_cli(capsys, *argv)


def run_installed(*argv):
    """The console script ``dsmoe`` in a subprocess (what a user runs); returns (code, out, err)."""
    p = subprocess.run([str(Path(sys.executable).with_name("dsmoe")), *argv],
                       capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    code, _, err = run_installed("init", str(out), "--preset", "tiny", "--seed", "3", "--set", "num_hidden_layers=2")
    assert code == 0, err
    return out


def test_init_writes_hf_layout(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "deepseek" and cfg["num_hidden_layers"] == 2
    assert (ckpt / "model.safetensors").is_file()


def test_info_json_for_16b_preset(run):
    code, out, _ = run("info", "preset:deepseek-moe-16b", "--json")
    d = json.loads(out)
    assert code == 0 and round(d["params_total"] / 1e9, 1) == 16.4 and round(d["params_active"] / 1e9, 1) == 2.8


def test_generate_json_is_deterministic_and_fused_matches_eager(ckpt, run):
    a = run("generate", str(ckpt), "--prompt-ids", "1 2 3", "--max-new-tokens", "6", "--json")
    b = run("generate", str(ckpt), "--prompt-ids", "1 2 3", "--max-new-tokens", "6", "--json", "--backend", "fused")
    assert a[0] == 0 and b[0] == 0, a[2] + b[2]
    ids = json.loads(a[1])["ids"]
    assert len(ids) == 6 and json.loads(b[1])["ids"] == ids


def test_inspect_json(ckpt, run):
    code, out, err = run("inspect", str(ckpt), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert [p["name"] for p in d["passes"]] == ["fuse_router", "outline_moe", "fuse_gated_mlp"]
    assert {"name", "rewrites", "nodes_before", "nodes_after", "max_abs_err"} <= set(d["passes"][0])
    assert sum(d["captured_nodes_per_layer"].values()) == d["captured_nodes"]
    assert d["ops"]["dsmoe::moe"] == 1 and d["ops"]["dsmoe::route"] == 1 and d["ops"]["dsmoe::gated_mlp"] == 2


def test_inspect_dump_after(ckpt, run):
    code, out, err = run("inspect", str(ckpt), "--dump-after", "outline_moe", "--no-verify")
    assert code == 0, err
    assert "torch.ops.dsmoe.moe.default" in out


@pytest.mark.parametrize("argv, message", [
    (["init", "{ckpt}", "--preset", "tiny"], "already exists (use --force"),
    (["init", "{tmp}/x", "--preset", "huge"], "unknown preset 'huge'"),
    (["init", "{tmp}/x", "--preset", "tiny", "--set", "num_experts_per_tok=99"], "num_experts_per_tok 99 exceeds"),
    (["info", "{tmp}/nowhere"], "does not exist"),
    (["generate", "{ckpt}", "--prompt-ids", "1 x"], "--prompt-ids must be integers"),
    (["generate", "{ckpt}", "--prompt-ids", "1 99999"], "outside the vocabulary"),
    (["generate", "{ckpt}", "--prompt", "hello"], "tokenizer.json"),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--backend", "ort"], "no model.onnx"),
    (["inspect", "{ckpt}", "--dump-after", "nope"], "unknown pass 'nope'"),
    (["init", "/proc/forbidden/x", "--preset", "tiny"], "cannot write output"),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--device", "tpu"], "unknown device 'tpu'"),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--cuda-graph"], "--cuda-graph needs --backend fused --device cuda"),
])
def test_user_errors_are_one_line_exit_2(ckpt, tmp_path, run, argv, message):
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    code, out, err = run(*argv)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{")
    code, _, err = run_installed("info", str(tmp_path))
    assert code == 2 and err.startswith("error: malformed config")


def test_in_process_main_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "missing")])
    assert e.value.code == 2


def test_checkpoint_error_through_the_cli(ckpt, tmp_path, run):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = run("generate", str(bad), "--prompt-ids", "1 2")
    assert code == 2 and "corrupt or truncated safetensors file model.safetensors" in err


def test_prompt_text_with_tokenizer_json(ckpt, tmp_path, run):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(256)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    src = tmp_path / "with_tok"
    src.mkdir()
    for f in ckpt.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tok.save(str(src / "tokenizer.json"))
    code, out, err = run("generate", str(src), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    d = json.loads(out)
    _, out2, _ = run("generate", str(ckpt), "--prompt-ids", "1 2 3", "--max-new-tokens", "4", "--json")
    assert d["ids"] == json.loads(out2)["ids"]
    assert d["text"] == " ".join(f"w{i}" for i in d["ids"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("argv", [["generate", "{ckpt}", "--prompt-ids", "1", "--device", "cuda", "--backend", "fused"],
                                  ["bench", "--suite", "moe-layer", "--device", "cuda", "--preset", "tiny"]])
def test_cuda_without_a_gpu_is_one_line(ckpt, run, argv):
    code, out, err = run(*[a.format(ckpt=ckpt) for a in argv])
    assert code == 2 and "no CUDA device here" in err and len(err.strip().splitlines()) == 1, (out, err)


def test_generate_on_interpreted_triton_kernels_gives_eagers_tokens(ckpt, run):
    """`--kernels triton-interpret`: the fused graph's route/moe run the Triton GPU kernels under
    Triton's interpreter on the CPU — the token-for-token proof that the kernels compute the model."""
    a = run("generate", ckpt, "--prompt-ids", "1 2 3", "--max-new-tokens", "5", "--json")
    b = run("generate", ckpt, "--prompt-ids", "1 2 3", "--max-new-tokens", "5", "--json", "--backend", "fused",
            "--kernels", "triton-interpret")
    assert a[0] == 0 and b[0] == 0, a[2] + b[2]
    assert json.loads(b[1])["ids"] == json.loads(a[1])["ids"]


def test_inspect_verifies_the_passes_on_interpreted_triton_kernels(ckpt, run):
    code, out, err = run("inspect", ckpt, "--json", "--kernels", "triton-interpret")
    assert code == 0, err
    d = json.loads(out)
    assert d["kernels"] == "triton-interpret" and all(p["rel_err"] <= 1e-4 for p in d["passes"])


@pytest.mark.parametrize("argv, message", [
    (["generate", "{ckpt}", "--prompt-ids", "1", "--kernels", "triton-interpret"], "use --backend fused"),
    (["build-kernels", "--arch", "sm_12", "--out", "{tmp}/k"], "unsupported architecture 'sm_12'"),
])
def test_kernel_flags_refused_where_they_do_not_apply(ckpt, tmp_path, run, argv, message):
    code, _, err = run(*[a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "k").exists()


@pytest.mark.slow
def test_build_kernels_writes_cubins_ptx_and_manifest(tmp_path, run):
    code, _, err = run("build-kernels", "--arch", "sm_90", "--out", tmp_path / "k")
    assert code == 0, err
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["kernels"] and all(k["arch"] == "sm_90" for k in manifest["kernels"].values())
    assert any(p.suffix == ".cubin" for p in (tmp_path / "k" / "sm_90").iterdir())
