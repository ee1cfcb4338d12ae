"""Outputs that are never half-written, never lost, and never someone else's.

**A single file** (``--router-stats-out``, ``--plot``, ``--save-*``, results files) goes through
:func:`write_output_file`; **a directory** (``dsmoe init``'s checkpoint, ``dsmoe-export``'s
export) through :class:`OutputDir`::

    with OutputDir(out, force=force, kind="export", inputs=[source]) as staging:
        ... write files into staging.path ...
        staging.commit()          # atomic: ``out`` names the old complete output or the new one

The rules, in the order they are checked (:mod:`dsmoe.output_checks`):

1. ``out`` must not be the current directory (or hold it), nor an input of the same command, nor
   hold one, nor be (by device and inode) one of the files an input directory holds; paths are
   compared resolved (symlinks, symlinked parents). An existing ``out`` is refused unless
   ``force``, and even then only when it is a dsmoe output (it carries dsmoe's own :data:`MARKER`)
   or an empty directory, and holds no mount point and is none.
2. The target is *claimed* with an exclusive ``flock`` on ``.NAME.lock`` beside it, held until
   the command ends: a second dsmoe writing the same ``out`` is refused in one line.
3. Holding the claim, leftovers of earlier runs that died (``.NAME.tmp-*``, ``.NAME.old-*``) are
   cleaned: ``out`` is restored from ``.NAME.old-*`` if a kill came between the two renames of the
   fallback path below, files of the user's found in a leftover are moved back into ``out``, and
   only then is what dsmoe wrote removed.
4. Files are written into a temporary sibling ``.NAME.tmp-PID-XXXX``; on any exception or a signal
   that ends the process (TERM, HUP, INT, QUIT, USR1, USR2) it is removed, with the parent
   directories the command created, and the command exits ``128 + signal``.
5. :meth:`OutputDir.commit` lists what dsmoe wrote in the marker, then swaps the finished
   directory into place with ``renameat2(RENAME_EXCHANGE)`` (one atomic step), moves whatever the
   user had put into the old output (not listed in its marker) into the new one (a ``note:``
   names it), and removes only the files the old marker lists. Where the filesystem cannot
   exchange, it renames the old output aside first (rule 3 repairs a kill in between).
6. Permissions follow the umask (directories 0777, files 0666, minus the umask). Names of
   temporaries are shortened for long (valid) output names.

A full disk or a file-size limit while writing is one :class:`DsmoeError`, with nothing left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dsmoe.errors import DsmoeError
from dsmoe.output_checks import (
    MARKER,
    check_target,
    first_existing_ancestor_is_dir,
    foreign_entries,
    input_identities,
    is_dsmoe_output,
    listing,
    refuse_inputs,
    refuse_mounts,
    remove_listed,
    side_name,
    written_by_dsmoe,
)

__all__ = ["MARKER", "Interrupted", "OutputDir", "check_output_file", "check_target", "is_dsmoe_output",
           "trapped_signals", "write_failure", "write_output_file"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (a file-size limit)",
                 errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.ENAMETOOLONG: "file name too long", errno.ENOTDIR: "a part of the path is a file",
                 errno.EISDIR: "it is a directory"}
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}  # write failures whatever the file
PAUSE_ENV = "DSMOE_TEST_PAUSE_AT"  # test hook: pause at a named point of commit (crash-safety tests)
# every signal whose default action ends the process and that a user sends to stop a command
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
log = logging.getLogger("dsmoe")


class Interrupted(DsmoeError):
    """The command was stopped by a signal; what it was writing has been removed (exit 128 + n)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def trapped_signals() -> Iterator[None]:
    """While inside, every signal of :data:`STOP_SIGNALS` raises :class:`Interrupted` (so
    ``finally``/``except`` blocks clean up); outside the main thread, signals are left alone."""
    def handler(signum, frame):
        raise Interrupted(signum)

    old = {}
    try:
        for sig in STOP_SIGNALS:
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                break
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# ---- single files ---------------------------------------------------------------------------------

def check_output_file(path: str | Path, *, force: bool, inputs: Iterable[str | Path] = (), option: str = "") -> Path:
    """Whether the file ``path`` may be written (the checks of :func:`write_output_file`), for a
    command to call before heavy work; returns the absolute path."""
    out = Path(os.path.abspath(path))
    what = f"{option} {out}" if option else str(out)
    if len(os.fsencode(out.name)) > 255:
        raise DsmoeError(f"cannot write {what}: file name too long")
    if out.is_dir() and not out.is_symlink():
        raise DsmoeError(f"cannot write {what}: it is a directory (give a file name)")
    first_existing_ancestor_is_dir(out)
    refuse_inputs(out, input_identities(inputs), "it")
    if os.path.lexists(out):
        if not force:
            raise DsmoeError(f"{what} already exists (use --force to replace it)")
        if out.is_symlink() or not out.is_file():
            raise DsmoeError(f"refusing to replace {what}: it is not a regular file; remove it yourself")
    return out


def write_output_file(path: str | Path, content: bytes | str | Callable[[Path], object], *, force: bool,
                      inputs: Iterable[str | Path] = (), option: str = "") -> Path:
    """Write one output file the safe way; THE function for every "write this file" option.

    ``content`` is the bytes/str to write, or a ``writer(tmp_path)`` that writes the file itself
    (``lambda p: fig.savefig(p)``, ``lambda p: np.save(p, a)``; ``tmp_path`` keeps the output's
    suffix). ``inputs``: the command's inputs (files or directories; every file in a directory
    counts). ``option`` names the option in messages (``"--router-stats-out"``).

    - never one of the inputs (resolved paths, then device + inode), never a directory;
    - refused if it exists unless ``force`` (and then only a regular file, not a symlink);
    - atomic: written to a temporary in the same directory, flushed, then ``os.replace``: readers
      see the old file or the new one; missing parent directories are created (and removed again
      on failure);
    - nothing half-written: on any error, a full disk (one :class:`DsmoeError` line) or a signal
      (:data:`STOP_SIGNALS`, exit ``128 + n``) the temporary is removed. Only SIGKILL can leave a
      ``.dsmoe-*.tmp*`` file beside it.

    Returns the absolute path written.
    """
    out = check_output_file(path, force=force, inputs=inputs, option=option)
    created = _make_parents(out.parent)
    tmp = None
    try:
        with trapped_signals():
            fd, name = tempfile.mkstemp(prefix=".dsmoe-", suffix=f".tmp{out.suffix[:20]}", dir=out.parent)
            tmp = Path(name)
            if callable(content):
                os.close(fd)
                content(tmp)
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(content.encode() if isinstance(content, str) else content)
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            if os.path.lexists(out) and not force:  # appeared while we wrote
                raise DsmoeError(f"{out} already exists (use --force to replace it)")
            os.replace(tmp, out)
            tmp = None
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        code = _errno_of(e)
        if code is not None and not isinstance(e, DsmoeError) and (isinstance(e, OSError) or code in _FULL):
            raise _write_error(out, OSError(code, os.strerror(code))) from None
        raise
    return out


# ---- directories ----------------------------------------------------------------------------------

class OutputDir:
    """A claimed, temporary, atomically committed output directory (see the module docstring)."""

    def __init__(self, out: str | Path, *, force: bool, kind: str, inputs: Iterable[str | Path] = ()):
        self.out = Path(os.path.abspath(out))
        self.force, self.kind = force, kind
        self.inputs = [Path(os.path.abspath(p)) for p in inputs]
        self.parent = self.out.parent
        self.path: Path | None = None   # the temporary directory to fill
        self.committed = False
        self.kept: list[str] = []       # the user's files an old output held, kept in the new one
        self._lock_fd: int | None = None
        self._created: list[Path] = []
        self._signals: contextlib.ExitStack | None = None

    def _side(self, tag: str) -> Path:
        return side_name(self.out, tag)

    # ---- entering: checks, claim, leftovers, temp ------------------------------------------
    def __enter__(self) -> OutputDir:
        check_target(self.out, force=self.force, inputs=self.inputs)
        try:
            self._created = _make_parents(self.parent)
            self._claim()
            self._clean_leftovers()
            check_target(self.out, force=self.force, inputs=self.inputs)  # again, now that we hold the claim
            self.path = Path(tempfile.mkdtemp(prefix=self._side(f"tmp-{os.getpid()}-").name, dir=self.parent))
            os.chmod(self.path, 0o777 & ~_umask())
            _write_marker(self.path, {"kind": self.kind, "created": time.time(), "staging": True})
        except BaseException as e:
            self._cleanup()
            if isinstance(e, OSError):
                raise _write_error(self.out, e) from None
            raise
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(trapped_signals())
        return self

    def _claim(self) -> None:
        lock = self._side("lock")
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DsmoeError(f"another dsmoe process is writing {self.out} (it holds {lock.name}); "
                                 "wait for it or choose another --out") from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its previous holder unlinked while we waited
                self._lock_fd = fd
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)

    def _clean_leftovers(self) -> None:
        """Temps and set-aside copies of dead runs (a live run would hold the claim)."""
        stem = self._side("").name
        olds = sorted(self.parent.glob(f"{glob_escape(stem)}old-*"))
        if not os.path.lexists(self.out) and olds:
            os.replace(olds[-1], self.out)  # a kill between the fallback's two renames: restore
        for p in [*self.parent.glob(f"{glob_escape(stem)}tmp-*"), *self.parent.glob(f"{glob_escape(stem)}old-*")]:
            if p.is_dir() and not p.is_symlink():
                self._salvage(p)
            else:
                p.unlink(missing_ok=True)
        self._side("paused").unlink(missing_ok=True)

    def _salvage(self, old: Path) -> None:
        """Move the user's files out of a leftover (an old output a dead run swapped aside) back
        into ``out``, then remove what dsmoe wrote there."""
        mine = written_by_dsmoe(old)
        if mine is not None and is_dsmoe_output(self.out):
            for rel in foreign_entries(old, mine):
                if not os.path.lexists(self.out / rel):
                    (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(old / rel, self.out / rel)
        left = remove_listed(old)
        if left:
            log.info(f"{old} holds files dsmoe did not write ({', '.join(left[:5])}): left there for you")

    # ---- committing ---------------------------------------------------------------------------
    def commit(self) -> Path:
        """Move the finished temporary directory to ``out`` atomically (replacing an old output,
        keeping what the user had put into it)."""
        assert self.path is not None and not self.committed
        self._swap_in(self.out)
        self.committed = True
        self.path = None
        return self.out

    def set_aside(self, suffix: str = "failed") -> Path:
        """Keep the uncommitted output for inspection at ``<out>.<suffix>`` (replacing an older
        dsmoe one there, with the same rules as ``out``) instead of removing it; ``out`` itself is
        left untouched. A :class:`DsmoeError` says why it could not be kept (the temp is removed)."""
        assert self.path is not None and not self.committed
        dest = self.out.with_name(f"{self.out.name}.{suffix}")
        try:
            check_target(dest, force=True, inputs=self.inputs)
            self._swap_in(dest)
        except (DsmoeError, OSError) as e:
            _rmtree(self.path)
            self.path = None
            why = e if isinstance(e, DsmoeError) else _write_error(dest, e)
            raise DsmoeError(f"the failed output was not kept: {why}") from None
        self.path = None
        return dest

    def _swap_in(self, dest: Path) -> None:
        """Steps of rule 5: list, exchange (or rename aside), move the user's files, remove the old."""
        assert self.path is not None
        files, dirs = listing(self.path)
        _write_marker(self.path, {"kind": self.kind, "created": time.time(), "files": [f for f in files if f != MARKER],
                                  "dirs": dirs})
        _fix_permissions(self.path)
        foreign: list[str] = []
        if os.path.lexists(dest):
            refuse_mounts(dest)
            mine = written_by_dsmoe(dest)
            if mine is None and any(dest.iterdir()):
                raise DsmoeError(f"refusing to replace {dest}: it is not a dsmoe output listing its files")
            foreign = foreign_entries(dest, mine) if mine is not None else []
            clash = [r for r in foreign if os.path.lexists(self.path / r)]
            if clash:
                raise DsmoeError(f"refusing to replace {dest}: {dest / clash[0]} is not a file dsmoe wrote, and the "
                                 "new output has one by that name; move it away and run again")
        _pause("before-commit", self._side("paused"))
        if os.path.lexists(dest) and _exchange(self.path, dest):
            _pause("after-exchange", self._side("paused"))
            old = self.path  # now the old output
        else:
            old = None
            if os.path.lexists(dest):
                old = side_name(dest, f"old-{os.getpid()}")
                os.replace(dest, old)
                _pause("between-renames", self._side("paused"))
            os.replace(self.path, dest)
        self.path = None
        if old is None:
            return
        for rel in foreign:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(old / rel, dest / rel)
        left = remove_listed(old)
        if foreign:
            self.kept = foreign
            log.info(f"kept in {dest} what dsmoe did not write there: {', '.join(foreign[:8])}"
                     + (f" (+{len(foreign) - 8} more)" if len(foreign) > 8 else ""))
        if left:
            log.info(f"{old} holds files that appeared while replacing {dest}: left there for you")

    # ---- leaving -----------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb):
        if self._signals is not None:
            self._signals.close()
            self._signals = None
        self._cleanup()
        code = _errno_of(exc)
        if code in _FULL and not self.committed and not isinstance(exc, DsmoeError):
            raise _write_error(self.out, OSError(code, os.strerror(code))) from None
        return False

    def _cleanup(self) -> None:
        if self.path is not None:
            _rmtree(self.path)
            self.path = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._side("lock"))
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.committed:
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if still empty


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _write_marker(d: Path, doc: dict) -> None:
    tmp = d / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, d / MARKER)


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing directories up to ``parent``; returns them (outermost first)."""
    missing = []
    p = parent
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return created


def _exchange(a: Path, b: Path) -> bool:
    """``renameat2(a, b, RENAME_EXCHANGE)``; False where the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rmtree(p: Path) -> None:

    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_permissions(root: Path) -> None:
    """Directories 0777 and files 0666 minus the umask (temp files are created 0700/0600)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(d, name)):
                os.chmod(os.path.join(d, name), 0o666 & ~mask)


def _errno_of(exc: BaseException | None) -> int | None:
    """The errno of a failed write: an OSError's, or the ``os error N`` that libraries writing
    files in Rust or C++ (safetensors, onnx) put in their own exception's message."""
    if isinstance(exc, OSError):
        return exc.errno
    m = re.search(r"os error (\d+)", str(exc)) if exc is not None else None
    return int(m.group(1)) if m else None


def write_failure(e: OSError) -> str | None:
    """The one line for a write that failed on a full or read-only device outside an output
    (standard output on ``/dev/full``); None for other errors. An error without a file name is
    standard output's: it is pointed at ``/dev/null`` so that the interpreter's final flush stays quiet."""
    if e.errno not in _FULL and e.errno not in (errno.EIO, errno.EPIPE):
        return None

    where = e.filename
    if where is None:  # dsmoe's own files carry their name: this is the standard output (click.echo)
        where = "standard output"
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
    why = _WRITE_ERRNOS.get(e.errno, os.strerror(e.errno).lower())
    return f"cannot write to {where or 'a file'}: {why}"


def _write_error(out: Path, e: OSError) -> DsmoeError:
    why = _WRITE_ERRNOS.get(e.errno, e.strerror or str(e))
    return DsmoeError(f"cannot write output {out}: {why} (nothing was written)")


def _pause(point: str, flag: Path) -> None:
    """Test hook: with ``DSMOE_TEST_PAUSE_AT=point``, announce the point in ``flag`` and wait
    (a crash-safety test kills the process there)."""
    if os.environ.get(PAUSE_ENV) == point:
        flag.write_text(f"{os.getpid()}\n")
        time.sleep(120)

