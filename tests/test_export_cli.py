"""`dsmoe export` / `dsmoe-export`: refusals exit 2 with one line (nothing heavy is exported)."""

from __future__ import annotations

import pytest

from dsmoe import cli


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
