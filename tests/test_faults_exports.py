"""Issue 21, classes 4, 7 and 8 on real exports: files that do not belong together, signals during
verification and around children, and a failed verification that cannot keep its ``.failed``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import onnx
import onnxruntime
import pytest
from conftest import one_line
from onnx import numpy_helper

from dsmoe.children import run_child
from dsmoe.export import export_model
from dsmoe.export.files import verify_export_files
from dsmoe.outputs import Interrupted

TINY1 = ["--set", "num_hidden_layers=1"]




@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """An export A, and B: A's directory with another model of the same shapes (one weight
    changed), as another export of the same preset and seed with other weights would be."""
    root = tmp_path_factory.mktemp("exports")
    export_model("preset:tiny", out=str(root / "a"), overrides={"num_hidden_layers": 2})
    b = _copy(root / "a", root / "b")
    model = onnx.load(str(b / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(b / "model.onnx"))
    assert (b / "model.onnx").stat().st_size == (root / "a" / "model.onnx").stat().st_size
    return root / "a", b


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_class4_the_report_lists_a_digest_of_every_file(exports):
    a, _ = exports
    report = json.loads((a / "export_report.json").read_text())
    assert set(report["digests"]) == set(report["files"]) - {"export_report.json"}
    verify_export_files(a)  # as written: accepted


@pytest.mark.parametrize("backend", ["ort", "genai"])
def test_class4_a_model_from_another_export_is_refused(exports, tmp_path, run, backend):
    a, b = exports
    mixed = _copy(a, tmp_path / "mixed")
    shutil.copy(b / "model.onnx", mixed / "model.onnx")
    code, out, err = run("generate", mixed, "--prompt-ids", "1 2 3", "--max-new-tokens", "2", "--backend", backend)
    one_line(code, err, 2, "model.onnx is damaged or not the file this export wrote")
    assert out == ""
    code, _, err = run("experts", mixed, "--prompt-ids", "1 2 3")
    one_line(code, err, 2, "not the file this export wrote")


def test_class4_edited_missing_or_broken_files_are_one_line(exports, tmp_path, run):
    a, _ = exports
    edited = _copy(a, tmp_path / "edited")
    doc = json.loads((edited / "genai_config.json").read_text())
    doc["search"]["past_present_share_buffer"] = not doc["search"]["past_present_share_buffer"]
    (edited / "genai_config.json").write_text(json.dumps(doc))
    code, _, err = run("generate", edited, "--prompt-ids", "1 2", "--backend", "genai")
    one_line(code, err, 2, "genai_config.json was changed after the export")
    (edited / "genai_config.json").unlink()
    code, _, err = run("generate", edited, "--prompt-ids", "1 2", "--backend", "ort")
    one_line(code, err, 2, "genai_config.json is missing or damaged")
    # an export from before the digests: a broken genai_config.json is still one line
    old = _copy(a, tmp_path / "old")
    report = json.loads((old / "export_report.json").read_text())
    del report["digests"]
    (old / "export_report.json").write_text(json.dumps(report))
    flipped = json.loads((a / "genai_config.json").read_text())  # a dynamic graph under a static config
    flipped["search"]["past_present_share_buffer"] = not flipped["search"]["past_present_share_buffer"]
    (old / "genai_config.json").write_text(json.dumps(flipped))
    code, _, err = run("generate", old, "--prompt-ids", "1 2", "--backend", "genai")
    one_line(code, err, 2, "does not match", "past_present_share_buffer")
    for text in ("{not json", "[1, 2]", json.dumps({"model": {}})):
        (old / "genai_config.json").write_text(text)
        code, _, err = run("generate", old, "--prompt-ids", "1 2", "--backend", "genai")
        one_line(code, err, 2, "genai_config.json")


def test_class8_a_failed_verification_whose_failed_dir_cannot_be_kept(tmp_path, run, monkeypatch):
    import dsmoe.export.api as api

    monkeypatch.setattr(api, "verify_export", lambda *a, **k: {"passed": False, "summary": "max abs error 9 (> 1e-4)"})
    users = tmp_path / "e.failed"
    users.mkdir()
    (users / "mine.txt").write_text("the user's")
    code, _, err = run("export", "preset:tiny", *TINY1, "--out", tmp_path / "e", "--verify")
    one_line(code, err, 1, "ONNX Runtime differs from eager: max abs error 9", "not written", "not kept",
             "not a dsmoe output")
    assert (users / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.failed"]


def test_class7_a_signal_during_verification_is_the_signal(tmp_path, run, monkeypatch):
    real = onnxruntime.InferenceSession.run

    def interrupted(self, *a, **k):
        os.kill(os.getpid(), signal.SIGUSR2)  # delivered while ONNX Runtime runs: seen when it returns
        return real(self, *a, **k)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", interrupted)
    code, _, err = run("export", "preset:tiny", *TINY1, "--out", tmp_path / "e", "--verify")
    one_line(code, err, 128 + signal.SIGUSR2, "interrupted by SIGUSR2")
    assert list(tmp_path.iterdir()) == []


def test_class7_a_signal_takes_the_childs_whole_group_with_it(tmp_path):
    pids = tmp_path / "pids"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    t = time.monotonic()
    with pytest.raises(Interrupted) as e:
        run_child(["sh", "-c", f"sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait"])
    assert e.value.exit_code == 128 + signal.SIGUSR1 and time.monotonic() - t < 30
    for pid in map(int, pids.read_text().split()):  # the shell and its own child (a grandchild of ours)
        assert _gone(pid), pid


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # dead, waiting for its (new) parent to reap it
            return True
        time.sleep(0.1)
    return False
