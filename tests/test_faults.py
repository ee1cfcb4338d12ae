"""Bad input and faults: no silent wrong answers, no tracebacks, no lost or half-written outputs.

Each case was a wrong answer with exit 0, a traceback, or lost data before; each now ends
correct or in one line with the right exit code. Commands run in-process through the entry point
(``run_cli``); kills and resource limits run the installed command in a child process.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_line
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.checkpoint import INDEX, save_checkpoint
from dsmoe.config import DeepseekConfig
from dsmoe.errors import CheckpointError, ConfigError, DsmoeError
from dsmoe.outputs import MARKER, PAUSE_ENV

DSMOE = str(Path(sys.executable).with_name("dsmoe"))
TINY2 = ["--preset", "tiny", "--set", "num_hidden_layers=2"]




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2})
    return save_checkpoint(model, tmp_path_factory.mktemp("faults") / "tiny")


def copy_ckpt(src: Path, dst: Path, config_edit=None, tensors_edit=None) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "model.safetensors"))
    if tensors_edit:
        tensors_edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


# ---- configs that computed the wrong thing ---------------------------------------------------

def test_rope_parameters_of_transformers_v5_are_read(ckpt, tmp_path):
    def v5(cfg):
        cfg.pop("rope_theta")
        cfg["rope_parameters"] = {"rope_theta": 50000.0, "rope_type": "default"}

    src = copy_ckpt(ckpt, tmp_path / "v5", config_edit=v5)
    legacy = copy_ckpt(ckpt, tmp_path / "legacy", config_edit=lambda c: c.update(rope_theta=50000.0))
    assert dsmoe.load_config(src).rope_theta == 50000.0
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129]])
    with torch.no_grad():
        got, want, default = dsmoe.load(src)(ids), dsmoe.load(legacy)(ids), dsmoe.load(ckpt)(ids)
    assert torch.equal(got, want) and not torch.allclose(got, default)


@pytest.mark.parametrize("rope, match", [
    ({"rope_theta": 1e4, "rope_type": "default", "factor": 2.0}, "field 'factor' is not understood"),
    ({"rope_theta": 1e4, "rope_type": "longrope", "factor": 2.0}, "unsupported feature rope_scaling"),
    ({"rope_theta": 1e4, "rope_type": "bogus"}, "unknown rope_parameters.rope_type 'bogus'"),
    ({"full_attention": {"rope_theta": 1e4}}, "per-layer-type rope_parameters"),
    ("yes", "rope_parameters must be an object"),
])
def test_rope_parameters_dsmoe_cannot_honour_are_refused(rope, match):
    with pytest.raises(ConfigError, match=match):
        DeepseekConfig.from_dict({**DeepseekConfig.from_name("tiny").to_dict(), "rope_parameters": rope}).validate()


def test_rope_parameters_that_disagree_with_rope_theta_are_refused():
    d = {**DeepseekConfig.from_name("tiny").to_dict(), "rope_theta": 10000.0, "rope_parameters": {"rope_theta": 5e4}}
    with pytest.raises(ConfigError, match=r"rope_theta 10000\.0 disagrees with rope_parameters\.rope_theta 50000\.0"):
        DeepseekConfig.from_dict(d)


@pytest.mark.parametrize("theta", [0, -1.0, None, float("inf")])
def test_rope_theta_must_be_positive(theta):
    with pytest.raises(ConfigError, match="rope_theta must be a positive number"):
        DeepseekConfig.from_name("tiny", rope_theta=theta)


def test_head_dim_that_disagrees_with_the_heads_is_refused(ckpt, tmp_path, run):
    src = copy_ckpt(ckpt, tmp_path / "hd", config_edit=lambda c: c.update(head_dim=32))
    code, _, err = run("info", src)
    one_line(code, err, 2, "head_dim 32 disagrees with hidden_size 64 / num_attention_heads 4 = 16")
    ok = copy_ckpt(ckpt, tmp_path / "hd-ok", config_edit=lambda c: c.update(head_dim=16))
    assert dsmoe.load_config(ok).head_dim == 16


def test_extra_keys_get_a_hint_that_names_what_they_are(ckpt, tmp_path):
    def mla(sd):
        sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] = torch.zeros(8, 64)

    with pytest.raises(CheckpointError, match="Multi-head Latent Attention weights"):
        dsmoe.load(copy_ckpt(ckpt, tmp_path / "mla", tensors_edit=mla))

    def bias(sd):
        sd["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.zeros(8)

    with pytest.raises(CheckpointError, match="V3 routing bias: the config must say topk_method 'noaux_tc'"):
        dsmoe.load(copy_ckpt(ckpt, tmp_path / "bias", tensors_edit=bias))


def test_n_group_with_greedy_routing_is_a_warning(run):
    code, _, err = run("info", "preset:tiny", "--set", "n_group=4", "--set", "topk_group=2")
    assert code == 0 and "warning: n_group 4 / topk_group 2 are ignored: topk_method 'greedy'" in err


def test_a_list_of_eos_ids_is_accepted(ckpt, tmp_path):
    src = copy_ckpt(ckpt, tmp_path / "eos", config_edit=lambda c: c.update(eos_token_id=[2, 7]))
    cfg = dsmoe.load_config(src)
    assert cfg.eos_token_ids == (2, 7)
    with pytest.raises(ConfigError, match="config field 'eos_token_id'"):
        DeepseekConfig.from_name("tiny", eos_token_id=["x"])
    with pytest.raises(ConfigError, match="eos_token_id must be a token id"):
        DeepseekConfig.from_name("tiny", eos_token_id=[-3])


@pytest.mark.parametrize("argv, needle", [
    (["--max-new-tokens", "1000000000"], "exceed the model's 256 positions"),
    (["--max-new-tokens", "253"], "4 prompt tokens + 253 new tokens exceed the model's 256 positions"),
])
def test_requests_beyond_the_models_positions_are_refused(ckpt, run, argv, needle):
    code, _, err = run("generate", ckpt, "--prompt-ids", "1 2 3 4", *argv)
    one_line(code, err, 2, needle, "ask for at most 252 new tokens")


# ---- non-finite weights --------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_ckpt(ckpt, tmp_path_factory):
    def poison(sd):
        sd["model.layers.1.mlp.experts.3.down_proj.weight"][0, 0] = float("nan")

    return copy_ckpt(ckpt, tmp_path_factory.mktemp("nan") / "nan", tensors_edit=poison)


def test_non_finite_weights_are_refused_naming_the_tensor(nan_ckpt, run):
    for argv in (["generate", nan_ckpt, "--prompt-ids", "1 2"], ["inspect", nan_ckpt]):
        code, _, err = run(*argv)
        one_line(code, err, 2, "model.layers.1.mlp.experts.3.down_proj.weight holds NaN or Inf", "--allow-nonfinite")


@pytest.mark.slow
def test_allowed_non_finite_weights_never_pass_as_results(nan_ckpt, run):
    # expert 3 of layer 1 is NaN: a prompt that routes to it gives NaN logits
    code, out, err = run("generate", nan_ckpt, "--prompt-ids", " ".join(map(str, range(40))), "--allow-nonfinite")
    one_line(code, err, 1, "logits are not finite (NaN/Inf) at step")
    assert out == ""
    code, _, err = run("inspect", nan_ckpt, "--allow-nonfinite")
    one_line(code, err, 1, "outputs are not finite (NaN/Inf) before any pass")


def test_pass_verification_fails_on_nan():
    from dsmoe.ir import capture
    from dsmoe.passes import pipeline
    from dsmoe.passes.context import PassContext, PassResult
    from dsmoe.passes.pipeline import VerificationError, run_pipeline

    def poison(gm, ctx):
        for p in gm.parameters():
            p.data.fill_(float("nan"))
            break
        return PassResult(rewrites=1)

    gm = capture(dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2}))
    old = pipeline.PASSES
    pipeline.PASSES = [("poison", poison)]
    try:
        with pytest.raises(VerificationError, match="pass poison made the model's outputs non-finite"):
            run_pipeline(gm, PassContext(verify=True))
    finally:
        pipeline.PASSES = old


def test_export_verification_fails_when_only_decode_is_nan(tmp_path, monkeypatch):
    """verify_export once took max(prefill, decode) and dropped a NaN decode error."""
    from dsmoe.export import api

    model = dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2})

    class HalfBroken:
        calls = 0
        kv_cache = "dynamic"

        def __init__(self, _dir):
            pass

        def __call__(self, *args):
            HalfBroken.calls += 1
            logits, present = model(*args, use_cache=True)
            return (logits if HalfBroken.calls == 1 else logits * float("nan")), present

    monkeypatch.setattr(api, "OrtDecoder", HalfBroken)
    v = api.verify_export(model, tmp_path, dtype=torch.float32)
    assert not v["passed"] and v["cases"]["prefill"]["finite"] and not v["cases"]["decode"]["finite"]
    assert v["summary"].startswith("non-finite outputs (NaN/Inf) in decode")


# ---- checkpoints that were read wrongly ----------------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    model = dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2})
    return save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=150_000)


def _index(path):
    return json.loads((path / INDEX).read_text())


def test_a_key_in_two_shards_is_refused(sharded):
    wm = _index(sharded)["weight_map"]
    key = "model.layers.1.mlp.experts.0.up_proj.weight"
    other = next(f for f in sorted(set(wm.values())) if f != wm[key])
    sd = load_file(str(sharded / other))
    sd[key] = torch.zeros_like(load_file(str(sharded / wm[key]))[key])  # a second, different copy
    save_file(sd, str(sharded / other))
    with pytest.raises(CheckpointError, match=f"{key}"):
        dsmoe.load(sharded)


def test_the_index_is_honoured_for_which_shard_holds_a_key(sharded):
    index = _index(sharded)
    key = "model.layers.1.mlp.experts.0.up_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other  # the index now names a shard that lacks it
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"puts {key} in {other}, which does not hold it"):
        dsmoe.load(sharded)


@pytest.mark.parametrize("name", ["../../other/x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_paths_outside_the_checkpoint_are_refused(sharded, name):
    index = _index(sharded)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        dsmoe.load(sharded)


@pytest.mark.parametrize("value", [3, None, ["a"]])
def test_weight_map_values_must_be_file_names(sharded, value):
    index = _index(sharded)
    index["weight_map"][next(iter(index["weight_map"]))] = value
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a shard file name"):
        dsmoe.load(sharded)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_weights_of_a_dtype_the_model_cannot_take(ckpt, tmp_path, dtype, run):
    def cast(sd):
        k = "model.layers.0.self_attn.q_proj.weight"
        sd[k] = sd[k].to(dtype)

    src = copy_ckpt(ckpt, tmp_path / "int", tensors_edit=cast)
    code, _, err = run("generate", src, "--prompt-ids", "1")
    one_line(code, err, 2, "model.layers.0.self_attn.q_proj.weight has dtype", "must be floating point")


# ---- requests that cannot be allocated -------------------------------------------------------------

def test_a_preset_too_large_for_memory_is_one_line(run, tmp_path):
    """init writes layer by layer: what must fit is one shard plus the largest part in fp32."""
    code, _, err = run("init", tmp_path / "x", "--preset", "tiny", "--set", "vocab_size=1000000000000")
    one_line(code, err, 2, "GiB of memory", "drawn in float32: 238,418.6 GiB", "are available")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_16b_preset_under_a_memory_limit(tmp_path):
    """The 16B preset is written part by part (one shard of 5 GiB plus a 2.2 GiB MoE layer in
    fp32, not 30.5 GiB); under a 4 GiB address-space limit even that is one line."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    p = subprocess.run([DSMOE, "init", str(tmp_path / "x"), "--preset", "deepseek-moe-16b", "--dtype", "bfloat16"],
                       capture_output=True, text=True, preexec_fn=limit, timeout=300)
    one_line(p.returncode, p.stderr.replace("wrote", ""), 2, "of memory", "drawn in float32: 2.2 GiB")


def test_a_seed_beyond_64_bits(run, tmp_path):
    code, _, err = run("init", tmp_path / "x", *TINY2, "--seed", str(2**64))
    one_line(code, err, 2, "seed must be an integer in [0, 2**64)")


# ---- damaged exports ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "tiny-ort"
    dsmoe.export.export_model(str(ckpt), out=str(out))
    return out


def _damaged(export_dir, tmp_path, edit) -> Path:
    d = tmp_path / "damaged"
    d.mkdir()
    for f in export_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    edit(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:5000]), "model.onnx is damaged"),
    (lambda d: (d / "model.onnx").write_bytes(b""), "model.onnx is empty"),
    (lambda d: (d / "model.onnx").write_bytes(os.urandom(4096)), "model.onnx is damaged"),
    (lambda d: _edit_config(d, num_hidden_layers=1), "config.json was changed after the export"),
    (lambda d: _edit_config(d, hidden_size=128), "config.json was changed after the export"),
    (lambda d: (_edit_config(d, num_key_value_heads=2), (d / "export_report.json").unlink()),
     "disagree on the KV heads (num_key_value_heads): graph 4, config 2"),
    (lambda d: (_edit_config(d, vocab_size=512), (d / "export_report.json").unlink()),
     "disagree on the vocabulary (vocab_size): graph 256, config 512"),
    (lambda d: (_edit_config(d, num_hidden_layers=3, first_k_dense_replace=1), (d / "export_report.json").unlink()),
     "the graph has 2 layers' cache inputs, the config says num_hidden_layers 3"),
])
def test_a_damaged_export_says_which_file(export_dir, tmp_path, run, damage, needle):
    d = _damaged(export_dir, tmp_path, damage)
    code, _, err = run("generate", d, "--backend", "ort", "--prompt-ids", "1 2")
    one_line(code, err, 2, needle)


def _edit_config(d: Path, **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_external_data(ckpt, tmp_path, run, monkeypatch, damage):
    from dsmoe.export import onnx_writer

    monkeypatch.setattr(onnx_writer, "TWO_GB", 0)  # every export writes external data
    out = tmp_path / "ext"
    dsmoe.export.export_model(str(ckpt), out=str(out))
    data = out / "model.onnx.data"
    assert data.is_file()
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    code, _, err = run("generate", out, "--backend", "ort", "--prompt-ids", "1 2")
    one_line(code, err, 2, "model.onnx.data is missing or damaged")


@pytest.mark.slow
@pytest.mark.parametrize("flags, needle", [
    (["--set", "num_hidden_layers=1"], "--set"), (["--dtype", "bogus"], "--dtype"),
    (["--allow-nonfinite"], "--allow-nonfinite"), (["--kernels", "triton-interpret"], "--kernels"),
])
def test_options_that_do_not_apply_to_an_export_are_refused(export_dir, run, flags, needle):
    code, _, err = run("generate", export_dir, "--backend", "ort", "--prompt-ids", "1 2", *flags)
    one_line(code, err, 2, needle, "not apply to an exported model")


@pytest.mark.parametrize("content", ["", "{not json", '{"model": 42}'])
def test_a_corrupt_tokenizer_json_is_one_line(ckpt, tmp_path, run, content):
    src = copy_ckpt(ckpt, tmp_path / "tok")
    (src / "tokenizer.json").write_text(content)
    code, _, err = run("generate", src, "--prompt", "hello")
    one_line(code, err, 2, "not a valid tokenizer.json")


# ---- outputs: never lost, never someone else's ---------------------------------------------------

def test_force_never_replaces_what_dsmoe_did_not_write(ckpt, tmp_path, run):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = run("init", mine, *TINY2, "--force")
    one_line(code, err, 2, "not a dsmoe output")
    code, _, err = run("export", ckpt, "--out", mine, "--force")
    one_line(code, err, 2, "not a dsmoe output")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_force_never_replaces_the_commands_input(ckpt, tmp_path, run):
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, ckpt.parent):
        code, _, err = run("export", ckpt, "--out", out, "--force")
        one_line(code, err, 2, "this command's input")
    assert sorted(p.name for p in ckpt.iterdir()) == before and (ckpt / "model.safetensors").is_file()


def test_out_dot_is_refused_before_any_work(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run("export", "preset:tiny", "--out", ".", "--force")
    one_line(code, err, 2, "the current directory")
    assert list(tmp_path.iterdir()) == []


def test_outputs_follow_the_umask(tmp_path, run):
    old = os.umask(0o022)
    try:
        assert run("init", tmp_path / "c", *TINY2)[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "c").iterdir()} == {0o644}


@pytest.mark.slow
def test_a_failed_verification_leaves_the_previous_export_untouched(ckpt, nan_ckpt, tmp_path, run, export_dir):
    out = tmp_path / "good"
    for f in export_dir.iterdir():
        out.mkdir(exist_ok=True)
        (out / f.name).write_bytes(f.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run("export", nan_ckpt, "--out", out, "--force", "--verify", "--allow-nonfinite")
    one_line(code, err, 1, "non-finite outputs", f"{out}: left as it was", f"kept in {out}.failed")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / "good.failed" / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_command_removes_the_directories_it_made(nan_ckpt, tmp_path, run):
    code, _, err = run("export", nan_ckpt, "--out", tmp_path / "a" / "b" / "out")
    one_line(code, err, 2, "holds NaN or Inf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_writers_of_one_output_one_refuses(tmp_path, run):
    out = tmp_path / "c"
    child = _paused_init(out, "before-commit")
    try:
        code, _, err = run("init", out, *TINY2)
        one_line(code, err, 2, "another dsmoe process is writing")
    finally:
        child.kill()
        child.wait()
    assert run("init", out, *TINY2)[0] == 0  # the dead writer's claim and temp are cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def _paused_init(out: Path, point: str, *extra: str) -> subprocess.Popen:
    return _paused(out, [DSMOE, "init", str(out), *TINY2, *extra], point)


def _paused(out: Path, argv: list[str], point: str) -> subprocess.Popen:
    """``argv`` in a child that pauses at ``point`` of writing ``out`` (the test hook), once it is there."""
    flag = out.parent / f".{out.name}.paused"
    child = subprocess.Popen(argv, env={**os.environ, PAUSE_ENV: point}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists():
        assert child.poll() is None, child.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    return child


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_cleans_up_before_exiting(tmp_path, sig):
    out = tmp_path / "c"
    child = _paused_init(out, "before-commit")
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + sig and f"interrupted by {signal.Signals(sig).name}" in err.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{out.name}.paused"]  # the test hook's own flag


@pytest.mark.slow
def test_sigkill_leaves_temps_the_next_run_removes(tmp_path, run):
    out = tmp_path / "c"
    child = _paused_init(out, "before-commit")
    child.kill()
    child.wait()
    assert any(p.name.startswith(".c.tmp-") for p in tmp_path.iterdir())
    assert run("init", out, *TINY2)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False])
def test_sigkill_during_a_forced_replace_never_loses_the_output(tmp_path, run, exchange):
    """Killed between the steps of --force's replacement, the target names a complete output (the
    new one, with the atomic exchange) or is restored by the next run (the fallback's window
    between its two renames); the next run removes every leftover."""
    out = tmp_path / "c"
    assert run("init", out, *TINY2, "--seed", "1")[0] == 0
    old = (out / "model.safetensors").read_bytes()
    if exchange:
        child = _paused_init(out, "after-exchange", "--force", "--seed", "2")
    else:  # the fallback for filesystems that cannot exchange two directories
        code = "import dsmoe.outputs as o; o._exchange = lambda a, b: False; from dsmoe.app.cli import main; main()"
        child = _paused(out, [sys.executable, "-c", code, "init", str(out), *TINY2, "--force", "--seed", "2"],
                        "between-renames")
    child.kill()
    child.wait()
    if exchange:
        assert (out / MARKER).is_file() and (out / "model.safetensors").read_bytes() != old  # complete, new
        assert run("init", out, *TINY2, "--force", "--seed", "3")[0] == 0
    else:
        assert not out.exists() and any(p.name.startswith(".c.old-") for p in tmp_path.iterdir())
        code, _, err = run("init", out, *TINY2, "--seed", "3")  # restores the old output, then refuses
        one_line(code, err, 2, "already exists")
        assert (out / "model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.slow
def test_sigkill_of_an_export_at_a_controlled_point(ckpt, tmp_path, run):
    out = tmp_path / "e"
    child = _paused(out, [str(Path(sys.executable).with_name("dsmoe-export")), str(ckpt), "--out", str(out)],
                    "before-commit")
    child.kill()
    child.wait()
    assert not out.exists() and any(p.name.startswith(".e.tmp-") for p in tmp_path.iterdir())
    code, _, err = run("export", ckpt, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


# ---- full disks and file-size limits --------------------------------------------------------------

@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = subprocess.run([DSMOE, "init", str(tmp_path / "c"), *TINY2], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300)
    one_line(p.returncode, p.stderr, 2, "cannot write output", "file too large", "nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip() or p.returncode})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_disk, ckpt, run):
    code, _, err = run("init", tiny_disk / "c", *TINY2)
    one_line(code, err, 2, "no space left on the device", "nothing was written")
    code, _, err = run("export", ckpt, "--out", tiny_disk / "e")
    one_line(code, err, 2, "no space left on the device", "nothing was written")
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.slow
def test_a_read_only_filesystem_is_one_line(tiny_disk, run):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    code, _, err = run("init", tiny_disk / "c", *TINY2)
    one_line(code, err, 2, "cannot write output")


def test_errors_are_dsmoe_errors():
    assert issubclass(CheckpointError, DsmoeError) and issubclass(ConfigError, DsmoeError)
