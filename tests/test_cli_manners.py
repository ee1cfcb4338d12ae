"""CLI manners: help answers without torch, `-h` everywhere, one error style, timing, next steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import pytest

from dsmoe.app import cli
from dsmoe.app.cli import export_cmd
from dsmoe.app.step_timing import Timing

HEAVY = ("torch", "onnxruntime", "onnx", "numpy", "transformers", "triton", "safetensors", "onnxruntime_genai",
         "matplotlib", "rich")


def test_help_imports_nothing_heavy():
    """Rendering `--help` of the group and of every command (those registered later too) loads
    click and light modules only; a loose bound on the count catches an import creeping back."""
    code = """
import json, sys
import click
from dsmoe.app.cli import cli, export_cmd
for cmd, name in [(cli, "dsmoe"), (export_cmd, "dsmoe-export"), *[(c, "dsmoe " + n) for n, c in cli.commands.items()]]:
    with click.Context(cmd, info_name=name) as ctx:
        assert "--help" in cmd.get_help(ctx)
print(json.dumps(sorted(sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout)
    heavy = sorted({m.split(".")[0] for m in loaded} & set(HEAVY))
    assert not heavy, f"dsmoe --help imports {heavy}: import them inside the command that needs them"
    assert len(loaded) < 400, f"{len(loaded)} modules for --help"


def _invoke(entry, argv, capsys) -> tuple[int, str, str]:
    """Run an entry point in-process: ``(exit code, stdout, stderr)``."""
    try:
        entry(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("argv", [["-h"], *[[n, "-h"] for n in cli.cli.commands]])
def test_dash_h_everywhere(argv, capsys):
    code, out, _ = _invoke(cli.main, argv, capsys)
    assert code == 0 and out.startswith("Usage: dsmoe")


def test_dash_h_on_dsmoe_export(capsys):
    code, out, _ = _invoke(cli.export_main, ["-h"], capsys)
    assert code == 0 and out.startswith("Usage: dsmoe-export") and "--quant" in out


@pytest.mark.parametrize("entry,argv,needle", [
    (cli.main, ["generate"], "Missing argument 'SOURCE'"),
    (cli.main, ["generate", "x", "--max-new-tokens", "many"], "'many' is not a valid integer"),
    (cli.main, ["generate", "x", "--no-such-option"], "No such option '--no-such-option'"),
    (cli.main, ["no-such-command"], "No such command 'no-such-command'"),
    (cli.main, ["generate", "x", "--backend", "gpu"], "'gpu' is not one of"),
    (cli.export_main, ["x", "--out"], "Option '--out' requires an argument"),
    (cli.export_main, ["x"], "Missing option '--out'"),
])
def test_usage_errors_are_one_error_line_exit_2(entry, argv, needle, capsys):
    code, out, err = _invoke(entry, argv, capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_a_usage_error_says_where_the_options_are(capsys):
    _, _, err = _invoke(cli.main, ["generate", "x", "--nope"], capsys)
    assert "(see 'dsmoe generate --help')" in err


def test_generate_reports_prefill_and_decode_times(capsys):
    code, out, err = _invoke(cli.main, ["generate", "preset:tiny", "--prompt-ids", "1 2 3", "--max-new-tokens", "5",
                                        "--json"], capsys)
    assert code == 0, err
    t = json.loads(out)["timing"]
    assert t["prompt_tokens"] == 3 and t["new_tokens"] == 5 and t["decode_steps"] == 4
    assert t["prefill_s"] > 0 and t["decode_s"] > 0 and t["decode_tokens_per_s"] == pytest.approx(4 / t["decode_s"])
    code, out, err = _invoke(cli.main, ["generate", "preset:tiny", "--prompt-ids", "1 2 3", "--max-new-tokens", "5"],
                             capsys)
    assert code == 0 and len(out.split()) == 5
    assert "5 tokens: prefill 3 tokens" in err and "decode 4 steps" in err and "tokens/s" in err


def test_timing_splits_the_first_call_from_the_rest():
    t = Timing()
    step = t.wrap(lambda x: x + 1)
    assert [step(i) for i in range(4)] == [1, 2, 3, 4]
    assert t.prefill_s is not None and t.decode_steps == 3
    d = t.as_dict(prompt_tokens=2, new_tokens=8, rows=2)
    assert d["decode_tokens_per_s"] == pytest.approx(2 * 3 / t.decode_s)


# ---- compare-backends (a real run of every backend: the Quick block of docs/cli.md, slow tier) ----

def test_backends_that_differ_fail_naming_the_token(capsys, monkeypatch):
    tokens = {"eager": [5, 6, 7, 8], "fused": [5, 6, 7, 8], "ort": [5, 6, 9, 8], "genai": [5, 6]}

    def fake(*, source, backend, **_):
        assert source == ("exp" if backend in ("ort", "genai") else "model")
        return [tokens[backend]], None

    monkeypatch.setattr("dsmoe.app.agreement.run_generate", fake)
    code, out, err = _invoke(cli.main, ["compare-backends", "model", "exp", "--prompt-ids", "1"], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: ort differs from eager at new token 3 of 4 (eager 7, ort 9)"), err
    tokens["ort"] = [5, 6, 7, 8]  # genai stopping early (at an eos) is not a difference
    code, out, err = _invoke(cli.main, ["compare-backends", "model", "exp", "--prompt-ids", "1"], capsys)
    assert code == 0 and "eager, fused, ort and genai agree on all 4 tokens (genai stopped at an eos id" in out


def test_compare_backends_needs_the_export_for_export_backends(capsys):
    code, _, err = _invoke(cli.main, ["compare-backends", "preset:tiny", "--prompt-ids", "1"], capsys)
    assert code == 2 and "ort, genai run an export" in err and "dsmoe-export preset:tiny --out DIR" in err


# ---- next steps -----------------------------------------------------------------------------------

def test_build_engine_script_without_trtexec_says_what_to_do(tmp_path):
    from dsmoe.config import DeepseekConfig
    from dsmoe.export.tensorrt import SCRIPT_FILE, write_tensorrt_files
    from dsmoe.plugins.trt.build import PluginBuild

    build = tmp_path / "build"
    build.mkdir()
    (build / "lib.so").write_bytes(b"")
    (build / "plugins.json").write_text("{}")
    (build / "build.json").write_text('{"archs": ["sm_90"]}')
    out = tmp_path / "export"
    out.mkdir()
    import torch

    write_tensorrt_files(out, DeepseekConfig.from_name("tiny"), dtype=torch.float32,
                         build=PluginBuild(build, build / "lib.so", build / "h.so", {}, True), max_batch=1, max_length=16)
    env = {"PATH": "/nonexistent", "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run(["/bin/sh", str(out / SCRIPT_FILE)], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 127
    assert "trtexec not found" in r.stderr and "install TensorRT" in r.stderr and "where trtexec exists" in r.stderr
    r = subprocess.run(["/bin/sh", str(out / SCRIPT_FILE), "nope"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_reexport_command_has_force_and_what_the_export_was(tmp_path):
    from dsmoe.export.runner import reexport_command

    (tmp_path / "export_report.json").write_text(json.dumps({"source": "models/x", "target": "portable", "dtype": "fp16",
                                                            "quant": {"scheme": {"type": "int4"}}}))
    cmd = reexport_command(tmp_path)
    assert cmd.startswith("dsmoe-export models/x --out ") and cmd.endswith("--router-stats --force")
    assert "--target portable" in cmd and "--dtype fp16" in cmd and "--quant int4" in cmd
    (tmp_path / "export_report.json").write_text(json.dumps({"source": "m", "target": "ort", "dtype": "fp32"}))
    assert reexport_command(tmp_path) == f"dsmoe-export m --out {tmp_path} --router-stats --force"


def test_random_checkpoints_are_known_as_such(tmp_path, capsys):
    import dsmoe
    from dsmoe.checkpoint import save_checkpoint
    from dsmoe.streaming import random_init_seed

    code, _, err = _invoke(cli.main, ["init", str(tmp_path / "r"), "--preset", "tiny", "--seed", "7"], capsys)
    assert code == 0, err
    assert random_init_seed(tmp_path / "r") == 7 and random_init_seed("preset:tiny") == 0
    save_checkpoint(dsmoe.load(tmp_path / "r"), tmp_path / "saved")  # weights from elsewhere: not known random
    assert random_init_seed(tmp_path / "saved") is None


def test_bench_writes_outside_the_source_tree():
    from dsmoe.bench.harness import DEFAULT_OUT

    bench = cli.cli.commands["bench"]
    out = next(p for p in bench.params if isinstance(p, click.Option) and p.name == "out_dir")
    assert out.default == "out/bench" and str(DEFAULT_OUT) == "out/bench"


def test_export_cmd_is_the_export_command():
    assert [p.name for p in export_cmd.params] == [p.name for p in cli.cli.commands["export"].params]
