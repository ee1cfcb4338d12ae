"""What an output may be, and what ``--force`` may delete (the checks of :mod:`dsmoe.outputs`).

Paths are compared **resolved** (symlinks, symlinked parents, ``..``) and by **identity**
(``st_dev``, ``st_ino``: the same file through a bind mount or a hard link), for the command's
inputs, every file in an input directory, and every output.

A directory is dsmoe's own output only when it carries dsmoe's :data:`MARKER`; the marker lists
the files and directories dsmoe wrote there, and ``--force`` replaces exactly those: anything else
found inside (a user's notes) is kept and moved into the new output. A directory holding a mount
point, or being one, is never replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from dsmoe.errors import DsmoeError

MARKER = ".dsmoe-output.json"  # written into every output; lists what --force may replace
_CHECKPOINT_FILES = re.compile(r"^(config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json)$")
_MAX_INPUT_FILES = 10_000  # files of one input directory compared by identity


def side_name(out: Path, tag: str) -> Path:
    """``.NAME.tag`` beside ``out`` (lock, temp, set-aside copies); a name too long to take the
    suffix within the 255-byte limit is shortened (with a digest of the full name)."""
    name = out.name
    if len(os.fsencode(name)) + len(tag) + 40 > 255:
        name = name[:120] + "~" + hashlib.sha256(os.fsencode(out.name)).hexdigest()[:12]
    return out.parent / f".{name}.{tag}"


def identity(p: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_marker(path: Path) -> dict | None:
    """The marker of a dsmoe output (None when ``path`` is not one)."""
    m = path / MARKER
    if m.is_symlink() or not m.is_file():
        return None
    try:
        doc = json.loads(m.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("kind"), str) else None


def is_dsmoe_output(path: Path) -> bool:
    """``path`` is a directory dsmoe wrote (it carries dsmoe's own marker; nothing else counts)."""
    return path.is_dir() and not path.is_symlink() and read_marker(path) is not None


def written_by_dsmoe(path: Path) -> tuple[set[str], set[str]] | None:
    """(files, directories) dsmoe wrote in the output ``path``, relative; None when not known.

    Outputs since the marker lists them carry the list; older markers without one: an export's
    ``export_report.json`` lists its files, a checkpoint is its config, shards and index."""
    doc = read_marker(path)
    if doc is None:
        return None
    if isinstance(doc.get("files"), list):
        return {str(f) for f in doc["files"]} | {MARKER}, {str(d) for d in doc.get("dirs", [])}
    if doc.get("staging"):
        return None
    if doc["kind"] == "export":
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, TypeError, AttributeError):
            files = json.loads((path / "export_report.json").read_text())["files"]
            return {str(f) for f in files if "/" not in str(f)} | {MARKER}, set()
        return None
    if doc["kind"] == "checkpoint":
        return {p.name for p in path.iterdir() if _CHECKPOINT_FILES.match(p.name)} | {MARKER}, set()
    return None


def listing(root: Path) -> tuple[list[str], list[str]]:
    """Every file and directory under ``root`` (relative, sorted; symlinks count as files)."""
    files, dirs = [], []
    for d, subdirs, names in os.walk(root):
        rel = os.path.relpath(d, root)
        for s in list(subdirs):
            if os.path.islink(os.path.join(d, s)):
                names.append(s)
                subdirs.remove(s)
            else:
                dirs.append(os.path.normpath(os.path.join(rel, s)))
        files += [os.path.normpath(os.path.join(rel, n)) for n in names]
    return sorted(files), sorted(dirs)


def foreign_entries(path: Path, mine: tuple[set[str], set[str]]) -> list[str]:
    """What inside the output ``path`` dsmoe did not write (top-most such entries, relative)."""
    files, dirs = mine
    out = []
    for d, subdirs, names in os.walk(path):
        rel = os.path.relpath(d, path)
        for s in list(subdirs):
            r = os.path.normpath(os.path.join(rel, s))
            if os.path.islink(os.path.join(d, s)) or r not in dirs:
                out.append(r)
                subdirs.remove(s)
        for n in names:
            r = os.path.normpath(os.path.join(rel, n))
            p = os.path.join(d, n)
            if r not in files or os.path.islink(p) or not os.path.isfile(p):
                out.append(r)
    return sorted(out)


def input_identities(inputs: Iterable[str | Path]) -> dict[tuple[int, int], Path]:
    """(device, inode) → resolved path of every input and every file in an input directory."""
    ids: dict[tuple[int, int], Path] = {}
    for src in inputs:
        src = Path(src)
        if not os.path.lexists(src):
            continue
        for p in [src, *_files_in(src)]:
            i = identity(p)
            if i is not None:
                ids.setdefault(i, Path(os.path.realpath(p)))
    return ids


def _files_in(src: Path, depth: int = 2) -> list[Path]:
    """The files an input directory holds, to ``depth`` levels (a checkpoint or an export is flat;
    the bound keeps ``SOURCE=.`` in a large tree cheap)."""
    if not src.is_dir():
        return []
    found: list[Path] = []
    level = [Path(os.path.realpath(src))]
    for _ in range(depth):
        nxt = []
        for d in level:
            with contextlib.suppress(OSError):
                for e in os.scandir(d):
                    if e.is_dir(follow_symlinks=False):
                        nxt.append(Path(e.path))
                    else:
                        found.append(Path(e.path))
            if len(found) > _MAX_INPUT_FILES:
                return found
        level = nxt
    return found


def refuse_inputs(out: Path, inputs: dict[tuple[int, int], Path], what: str = "it") -> None:
    """Refuse ``out`` when it is, holds, or (by identity) equals one of the inputs."""
    real = Path(os.path.realpath(out))
    out_id = identity(out)
    for i, src in inputs.items():
        if real == src or real in src.parents or (out_id is not None and out_id == i):
            raise DsmoeError(f"refusing to write {out}: {what} is (or holds) this command's input {src}")
        if out_id is not None:
            for anc in src.parents:
                if identity(anc) == out_id:
                    raise DsmoeError(f"refusing to write {out}: {what} holds this command's input {src}")


def first_existing_ancestor_is_dir(out: Path) -> None:
    """``--out`` under a file (``file.txt/out``) is one line, not a traceback later."""
    p = out.parent
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise DsmoeError(f"cannot write {out}: {p} is a file, not a directory")


def check_target(out: Path, *, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Whether ``out`` may be written (rule 1 of :mod:`dsmoe.outputs`); call it before heavy work."""
    out = Path(os.path.abspath(out))
    real, cwd = Path(os.path.realpath(out)), Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents or (identity(out) is not None and identity(out) == identity(cwd)):
        raise DsmoeError(f"refusing to write {out}: it is (or holds) the current directory; choose a new --out")
    ids = input_identities(inputs)
    refuse_inputs(out, ids)
    first_existing_ancestor_is_dir(out)
    if not os.path.lexists(out):
        return
    if not force:
        raise DsmoeError(f"output {out} already exists (use --force to replace it)")
    if out.is_symlink() or not out.is_dir():
        raise DsmoeError(f"refusing to replace {out}: it is not a directory dsmoe wrote; remove it yourself")
    entries = list(out.iterdir())
    if not entries:
        return
    if not is_dsmoe_output(out):
        raise DsmoeError(f"refusing to replace {out}: it is not a dsmoe output (no {MARKER}); "
                         "remove it yourself or choose another --out")
    refuse_mounts(out)
    mine = written_by_dsmoe(out)
    if mine is None:
        raise DsmoeError(f"refusing to replace {out}: an older dsmoe wrote it without listing its files; "
                         "remove it yourself or choose another --out")
    for rel in mine[0]:
        i = identity(out / rel) if not (out / rel).is_symlink() else None
        if i is not None and i in ids:
            raise DsmoeError(f"refusing to replace {out}: its {rel} is this command's input {ids[i]}")


def refuse_mounts(out: Path) -> None:
    """Never replace a mount point or a directory with a filesystem mounted inside it."""
    dev = os.lstat(out).st_dev
    if os.stat(out.parent).st_dev != dev or os.path.ismount(out):
        raise DsmoeError(f"refusing to replace {out}: it is a mount point; choose another --out")
    for d, subdirs, _ in os.walk(out):
        for s in subdirs:
            p = os.path.join(d, s)
            if not os.path.islink(p) and (os.lstat(p).st_dev != dev or os.path.ismount(p)):
                raise DsmoeError(f"refusing to replace {out}: a filesystem is mounted at {p} inside it; "
                                 "unmount it or choose another --out")


def remove_listed(path: Path) -> list[str]:
    """Remove what dsmoe wrote in the output (or staging directory) ``path``, then ``path`` itself
    if nothing else is left; returns what was left (not dsmoe's, kept)."""
    doc = read_marker(path)
    if doc is not None and doc.get("staging"):  # a temp of a run that died: dsmoe wrote all of it
        _rmtree(path)
        return []
    mine = written_by_dsmoe(path) if doc is not None else None
    if mine is None:
        left = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if not left:
            with contextlib.suppress(OSError):
                path.rmdir()
        return left
    files, dirs = mine
    for rel in sorted(files - {MARKER}):
        p = path / rel
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    for rel in sorted(dirs, key=lambda r: -r.count(os.sep)):
        with contextlib.suppress(OSError):
            (path / rel).rmdir()
    left = [p for p in path.iterdir() if p.name != MARKER]
    if not left:
        with contextlib.suppress(FileNotFoundError):
            (path / MARKER).unlink()
        with contextlib.suppress(OSError):
            path.rmdir()
    return sorted(p.name for p in left)


def _rmtree(path: Path) -> None:

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
