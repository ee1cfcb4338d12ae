"""`dsmoe export` / `dsmoe-export`: refusals exit 2 with one line (nothing heavy is exported)."""

from __future__ import annotations

import pytest

from dsmoe.app import cli
from dsmoe.errors import DsmoeError


def _exit_code(fn, argv) -> int:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


@pytest.mark.parametrize("entry,prefix", [(cli.main, ["export"]), (cli.export_main, [])])
def test_existing_output_exits_2(tmp_path, capsys, entry, prefix):
    out = tmp_path / "o"
    out.mkdir()
    assert _exit_code(entry, [*prefix, "preset:tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]


@pytest.mark.parametrize("flags,match", [(["--target", "nope"], "unsupported target"),
                                         (["--dtype", "int8"], "unsupported dtype")])
def test_unsupported_target_or_dtype_exits_2(tmp_path, capsys, flags, match):
    assert _exit_code(cli.main, ["export", "preset:tiny", "--out", str(tmp_path / "o"), *flags]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_prints_the_regions_a_pass_left_alone(tmp_path, capsys, monkeypatch):
    """Like ``inspect``, the export command lists every region a pass skipped, with the reason."""
    report = {"passes": [{"name": "fuse_router", "skipped": ["model.layers.1.mlp.gate: the graph's routing is not "
                                                            "the config's: config top_k 3, graph computes 2"]}],
              "verification": None}
    monkeypatch.setattr("dsmoe.export.export_model", lambda *a, **k: report)  # the command imports it when it runs
    cli.export_main(["preset:tiny", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "fuse_router left alone" in err and "config top_k 3, graph computes 2" in err


@pytest.mark.parametrize("entry,prefix", [(cli.main, ["--debug", "export"]), (cli.export_main, ["--debug"])])
def test_debug_shows_the_traceback_on_both_entry_points(tmp_path, entry, prefix):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(DsmoeError, match="already exists"):
        entry([*prefix, "preset:tiny", "--out", str(out)])
