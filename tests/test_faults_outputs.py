"""Issue 21, classes 1, 6 and 7: what ``--force`` and every "write this file" option may touch.

Data-loss cases compare the bytes of the user's files before and after, through real symlinks,
a real tmpfs mount (skipped where mounting is not allowed) and real signals. Refusals happen
before any model is loaded, so the commands run in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import one_line, run_cli

import dsmoe
from dsmoe.errors import DsmoeError
from dsmoe.outputs import MARKER, Interrupted, OutputDir, check_target, trapped_signals, write_output_file




def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (following nothing) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def ck(tmp_path) -> Path:
    """A checkpoint as ``dsmoe init`` leaves it (marker included); the weights are stand-in bytes:
    every refusal here comes before they are read."""
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dsmoe.load_config("preset:tiny").to_dict()))
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / MARKER).write_text(json.dumps({"kind": "checkpoint", "created": 0, "files": ["config.json", "model.safetensors"],
                                        "dirs": []}))
    return d


def _output(out: Path, files: dict[str, bytes], *, force: bool = False, kind: str = "export") -> OutputDir:
    with OutputDir(out, force=force, kind=kind) as staging:
        for name, data in files.items():
            (staging.path / name).parent.mkdir(parents=True, exist_ok=True)
            (staging.path / name).write_bytes(data)
        staging.commit()
    return staging


# ---- class 1: data loss under --force ---------------------------------------------------------------

def test_class1_force_never_deletes_the_source_through_a_symlink(ck, tmp_path, run):
    before = snapshot(ck)
    (tmp_path / "link").symlink_to(ck)
    (tmp_path / "alias").symlink_to(tmp_path)
    for argv in (["export", tmp_path / "link", "--out", ck],                 # symlinked source
                 ["export", ck, "--out", tmp_path / "alias" / "ck"],        # symlinked parent of --out
                 ["generate", tmp_path / "link", "--prompt-ids", "1", "--router-stats-out", tmp_path / "alias" / "ck" /
                  "config.json"]):
        code, _, err = run(*argv, "--force")
        assert code == 2 and "Traceback" not in err, err
    assert snapshot(ck) == before


def test_class1_force_never_deletes_an_input_file_by_identity(ck, tmp_path, run):
    """An old output whose listed file is the source's own file (a hard link): refused."""
    e = tmp_path / "e"
    _output(e, {"model.onnx": b"old"})
    os.unlink(e / "model.onnx")
    os.link(ck / "model.safetensors", e / "model.onnx")
    before = snapshot(ck)
    code, _, err = run("export", ck, "--out", e, "--force")
    one_line(code, err, 2, "this command's input")
    assert snapshot(ck) == before


def test_class1_only_dsmoes_own_marker_counts(tmp_path, run, ck):
    results = tmp_path / "results"
    results.mkdir()
    (results / "export_report.json").write_text("{}")  # the old "legacy marker": a user's file now
    (results / "mine.txt").write_text("years of work")
    (results / "fake").mkdir()
    (results / "fake" / MARKER).write_text("not json")
    before = snapshot(results)
    for argv in (["init", results, "--preset", "tiny", "--force"], ["export", ck, "--out", results, "--force"],
                 ["init", results / "fake", "--preset", "tiny", "--force"]):
        code, _, err = run(*argv)
        one_line(code, err, 2, "not a dsmoe output")
    assert snapshot(results) == before


def test_class1_replacing_an_output_keeps_the_users_files(tmp_path, caplog):
    out = tmp_path / "e"
    _output(out, {"model.onnx": b"old", "sub/weights.bin": b"old"})
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "mine.txt").write_text("mine too")
    (out / "link").symlink_to(tmp_path)  # a symlink of the user's: moved as a link, never followed
    with caplog.at_level("INFO", logger="dsmoe"):
        staging = _output(out, {"model.onnx": b"new"}, force=True)
    assert (out / "model.onnx").read_bytes() == b"new" and not (out / "sub" / "weights.bin").exists()
    assert (out / "notes.txt").read_text() == "my notes" and (out / "sub" / "mine.txt").read_text() == "mine too"
    assert (out / "link").is_symlink() and sorted(staging.kept) == ["link", "notes.txt", "sub/mine.txt"]
    assert "kept in" in caplog.text and "notes.txt" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    # the kept files are not dsmoe's: the next --force keeps them again
    _output(out, {"model.onnx": b"newer"}, force=True)
    assert (out / "notes.txt").read_text() == "my notes"


def test_class1_a_users_file_in_the_way_of_a_new_one_is_refused(tmp_path):
    out = tmp_path / "e"
    _output(out, {"model.onnx": b"old"})
    (out / "tokenizer.json").write_text("the user's")
    with pytest.raises(DsmoeError, match="not a file dsmoe wrote"):
        _output(out, {"model.onnx": b"new", "tokenizer.json": b"dsmoe's"}, force=True)
    assert snapshot(out) == {"model.onnx": b"old", "tokenizer.json": b"the user's", MARKER: (out / MARKER).read_bytes()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_class1_an_older_marker_without_a_list(tmp_path):
    """Outputs of an older dsmoe: an export's report lists its files; a checkpoint is its shards."""
    out = tmp_path / "e"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"kind": "export", "created": 0}))
    (out / "export_report.json").write_text(json.dumps({"files": ["model.onnx", "export_report.json"]}))
    (out / "model.onnx").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    _output(out, {"model.onnx": b"new"}, force=True)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "export_report.json").exists()
    other = tmp_path / "k"
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"kind": "kernels", "created": 0}))
    (other / "a.cubin").write_bytes(b"x")
    with pytest.raises(DsmoeError, match="without listing its files"):
        check_target(other, force=True)


@pytest.fixture
def mount(tmp_path):
    def do(where: Path, size: str = "256k") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                           text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
        mounted.append(where)
        return where

    mounted: list[Path] = []
    yield do
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], check=False)


def test_class1_force_never_crosses_a_mount_point(tmp_path, mount):
    out = tmp_path / "e"
    _output(out, {"model.onnx": b"old", "data/x.bin": b"old"})
    inner = mount(out / "data" / "mnt")
    (inner / "precious.bin").write_bytes(b"on another filesystem")
    with pytest.raises(DsmoeError, match="mounted at"):
        _output(out, {"model.onnx": b"new"}, force=True)
    assert (inner / "precious.bin").read_bytes() == b"on another filesystem"
    assert (out / "model.onnx").read_bytes() == b"old"
    other = mount(tmp_path / "m")  # --out itself a mount point
    _output(other / "x", {"a": b"1"})
    (other / "x" / MARKER).rename(other / MARKER)
    (other / MARKER).write_text(json.dumps({"kind": "export", "created": 0, "files": ["x/a"], "dirs": ["x"]}))
    with pytest.raises(DsmoeError, match="mount point"):
        check_target(other, force=True)


def test_class1_write_output_file_never_writes_an_input(ck, tmp_path):
    before = snapshot(ck)
    (tmp_path / "link").symlink_to(ck)
    for target in (ck / "config.json", tmp_path / "link" / "model.safetensors", ck):
        with pytest.raises(DsmoeError):
            write_output_file(target, "x", force=True, inputs=[tmp_path / "link"])
    os.link(ck / "config.json", tmp_path / "hard.json")  # the same inode under another name
    with pytest.raises(DsmoeError, match="input"):
        write_output_file(tmp_path / "hard.json", "x", force=True, inputs=[ck])
    assert snapshot(ck) == before


def test_class1_write_output_file_is_atomic_and_refuses_what_exists(tmp_path):
    f = tmp_path / "a" / "b" / "stats.json"
    assert write_output_file(f, "one", force=False) == f and f.read_text() == "one"
    with pytest.raises(DsmoeError, match="already exists"):
        write_output_file(f, "two", force=False)
    write_output_file(f, lambda p: p.write_text("two"), force=True)
    assert f.read_text() == "two"

    def dies(p: Path):
        p.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_output_file(f, dies, force=True)
    with pytest.raises(RuntimeError):
        write_output_file(tmp_path / "new" / "x.json", dies, force=False)
    assert f.read_text() == "two" and sorted(p.name for p in f.parent.iterdir()) == ["stats.json"]
    assert not (tmp_path / "new").exists()  # the parent it made is gone again
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "link.json").symlink_to(f)
    for bad, needle in ((tmp_path / "dir.json", "is a directory"), (tmp_path / "link.json", "not a regular file"),
                        (f / "under", "is a file, not a directory")):
        with pytest.raises(DsmoeError, match=needle):
            write_output_file(bad, "x", force=True)
    assert f.read_text() == "two"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT, signal.SIGTERM])
def test_class7_a_signal_while_writing_a_file_leaves_nothing(tmp_path, sig):
    def killed(p: Path):
        p.write_text("half")
        os.kill(os.getpid(), sig)

    old = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        write_output_file(tmp_path / "x.json", killed, force=False)
    assert e.value.exit_code == 128 + sig and list(tmp_path.iterdir()) == []
    assert signal.getsignal(sig) == old  # the handler is the caller's again
    with trapped_signals():
        assert signal.getsignal(sig) != old


# ---- class 6: writes outside the atomic path --------------------------------------------------------

def test_class6_a_full_disk_while_writing_a_file(mount, tmp_path):
    disk = mount(tmp_path / "disk", "64k")
    with pytest.raises(DsmoeError, match=r"no space left on the device.*nothing was written"):
        write_output_file(disk / "big.json", b"x" * 200_000, force=False)
    assert list(disk.iterdir()) == []


def test_class6_long_valid_names(tmp_path):
    name = "r" * 250 + ".png"  # 254 bytes: valid; dsmoe's temporaries must not push it past 255
    assert write_output_file(tmp_path / name, b"png", force=False).read_bytes() == b"png"
    _output(tmp_path / ("d" * 254), {"a": b"1"})
    _output(tmp_path / ("d" * 254), {"a": b"2"}, force=True)
    assert (tmp_path / ("d" * 254) / "a").read_bytes() == b"2"
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [254, 254]
    with pytest.raises(DsmoeError, match="file name too long"):
        write_output_file(tmp_path / ("x" * 256), b"", force=False)


def test_class6_out_under_a_file(tmp_path, run, ck):
    (tmp_path / "file.txt").write_text("a file")
    for argv in (["init", tmp_path / "file.txt" / "c", "--preset", "tiny"],
                 ["export", ck, "--out", tmp_path / "file.txt" / "sub" / "e"],
                 ["bench", "--suite", "moe-layer", "--out", tmp_path / "file.txt"]):
        code, _, err = run(*argv)
        one_line(code, err, 2, "is a file, not a directory")
    assert (tmp_path / "file.txt").read_text() == "a file"


def test_class6_stdout_on_a_full_device(capsys, monkeypatch):
    with open("/dev/full", "w") as full:
        monkeypatch.setattr("sys.stdout", full)
        code, _, err = run_cli(capsys, "info", "preset:tiny", "--json")
    one_line(code, err, 2, "cannot write to standard output: no space left on the device")


def test_class1_every_write_option_refuses_what_exists(tmp_path, run):
    from dsmoe.bench.report import machine_info, result_paths, stem

    taken = tmp_path / "taken.png"
    taken.write_text("the user's")
    for argv in (["generate", "preset:tiny", "--prompt-ids", "1", "--router-stats-out", taken],
                 ["experts", "preset:tiny", "--random", "1", "--plot", taken]):
        code, _, err = run(*argv)
        one_line(code, err, 2, "already exists (use --force to replace it)")
    name = stem({"machine": machine_info(1), "suite": "moe-layer", "quick": True})
    result_paths(tmp_path / "b", name)[1].parent.mkdir()
    result_paths(tmp_path / "b", name)[1].write_text("an earlier run's")
    code, _, err = run("bench", "--suite", "moe-layer", "--quick", "--threads", "1", "--out", tmp_path / "b")
    one_line(code, err, 2, "already exists (use --force to replace it)")
    assert taken.read_text() == "the user's"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [f"{name}.md"]


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGUSR1])
def test_class7_a_signal_while_writing_a_directory_leaves_nothing(tmp_path, sig):
    with pytest.raises(Interrupted) as e, OutputDir(tmp_path / "c", force=False, kind="checkpoint") as staging:
        (staging.path / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), sig)
    assert e.value.exit_code == 128 + sig and list(tmp_path.iterdir()) == []


def test_class1_a_kill_mid_replace_never_loses_the_users_files(tmp_path):
    """The states a SIGKILL can leave while replacing an output that holds a user's file: the old
    output swapped aside (``.NAME.tmp-*`` after the exchange, ``.NAME.old-*`` in the fallback). The
    next run puts the user's file back into the output before removing what dsmoe wrote."""
    out = tmp_path / "e"
    _output(out, {"model.onnx": b"new"})
    for leftover in (".e.tmp-99999-abcd", ".e.old-99999"):
        _output(tmp_path / leftover, {"model.onnx": b"old"})
        (tmp_path / leftover / "notes.txt").write_text(f"notes in {leftover}")
        with OutputDir(out, force=True, kind="export"):
            pass  # claiming the output cleans the leftovers of dead runs
        assert (out / "notes.txt").read_text() == f"notes in {leftover}"
        (out / "notes.txt").rename(tmp_path / f"kept{leftover}")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("kept")) == ["e"]
    shutil.rmtree(out)  # the fallback's window between its two renames: the old output is restored
    _output(tmp_path / ".e.old-99999", {"model.onnx": b"old"})
    with OutputDir(out, force=True, kind="export"):
        pass
    assert (out / "model.onnx").read_bytes() == b"old"
