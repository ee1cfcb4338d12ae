"""Output directories that are never half-written, never lost, and never someone else's.

Every directory dsmoe writes (``dsmoe init``'s checkpoint, ``dsmoe-export``'s export) goes
through :class:`OutputDir`::

    with OutputDir(out, force=force, kind="export", inputs=[source]) as staging:
        ... write files into staging.path ...
        staging.commit()          # atomic: ``out`` names the old complete output or the new one

The rules, in the order they are checked:

1. ``out`` must not be the current directory (or hold it), nor an input of the same command (or
   hold one); an existing ``out`` is refused unless ``force``, and even then only when it is a
   dsmoe output (it carries :data:`MARKER`, or is an export with ``export_report.json``) or an
   empty directory — ``--force`` never deletes a user's own files.
2. The target is *claimed* with an exclusive ``flock`` on ``.NAME.lock`` beside it, held until
   the command ends: a second dsmoe writing the same ``out`` is refused in one line.
3. Holding the claim, leftovers of earlier runs that died (``.NAME.tmp-*``, ``.NAME.old-*``; their
   owner would hold the claim if alive) are removed — after restoring ``out`` from ``.NAME.old-*``
   if a kill came between the two renames of the fallback path below.
4. Files are written into a temporary sibling ``.NAME.tmp-PID-XXXX``; on any exception, SIGTERM,
   SIGHUP or SIGINT it is removed, with the parent directories the command created.
5. :meth:`OutputDir.commit` swaps the finished directory into place with
   ``renameat2(RENAME_EXCHANGE)`` (one atomic step: readers see the old or the new output, never
   none), then removes the old one. Where the filesystem cannot exchange, it renames the old
   output aside first; a kill between the two renames is repaired by the next run (rule 3).
6. Permissions follow the umask (directories 0777, files 0666, minus the umask).

A full disk or a file-size limit while writing is one :class:`DsmoeError`, with nothing left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from dsmoe.errors import DsmoeError

MARKER = ".dsmoe-output.json"  # written into every output; what --force may replace
LEGACY_MARKERS = ("export_report.json",)  # exports made before the marker existed
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (a file-size limit)",
                 errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}  # write failures whatever the file
PAUSE_ENV = "DSMOE_TEST_PAUSE_AT"  # test hook: pause at a named point of commit (crash-safety tests)


class Interrupted(DsmoeError):
    """The command was stopped by a signal; what it was writing has been removed."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class OutputDir:
    """A claimed, temporary, atomically committed output directory (see the module docstring)."""

    def __init__(self, out: str | Path, *, force: bool, kind: str, inputs: Iterable[str | Path] = ()):
        self.out = Path(os.path.abspath(out))
        self.force, self.kind = force, kind
        self.inputs = [Path(os.path.abspath(p)) for p in inputs]
        self.parent = self.out.parent
        self.path: Path | None = None   # the temporary directory to fill
        self.committed = False
        self._lock_fd: int | None = None
        self._created: list[Path] = []
        self._signals: dict[int, object] = {}

    # ---- entering: checks, claim, leftovers, temp ------------------------------------------
    def __enter__(self) -> OutputDir:
        check_target(self.out, force=self.force, inputs=self.inputs)
        try:
            self._make_parents()
            self._claim()
            self._clean_leftovers()
            check_target(self.out, force=self.force, inputs=self.inputs)  # again, now that we hold the claim
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.parent))
            os.chmod(self.path, 0o777 & ~_umask())
            (self.path / MARKER).write_text(json.dumps({"kind": self.kind, "created": time.time()}) + "\n")
        except BaseException as e:
            self._cleanup()
            if isinstance(e, OSError):
                raise _write_error(self.out, e) from None
            raise
        self._trap_signals()
        return self

    def _make_parents(self) -> None:
        missing = []
        p = self.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._created.append(d)

    def _claim(self) -> None:
        lock = self.parent / f".{self.out.name}.lock"
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
        olds = sorted(self.parent.glob(f".{self.out.name}.old-*"))
        if not self.out.exists() and olds:
            os.replace(olds[-1], self.out)  # a kill between the fallback's two renames: restore
        name = self.out.name
        for p in [*self.parent.glob(f".{name}.tmp-*"), *self.parent.glob(f".{name}.old-*"),
                  *self.parent.glob(f".{name}.paused")]:
            _remove(p)

    # ---- committing ---------------------------------------------------------------------------
    def commit(self) -> Path:
        """Move the finished temporary directory to ``out`` atomically (replacing an old output)."""
        assert self.path is not None and not self.committed
        _fix_permissions(self.path)
        _pause("before-commit", self.parent / f".{self.out.name}.paused")
        if self.out.exists() and _exchange(self.path, self.out):
            self.committed = True
            _pause("after-exchange", self.parent / f".{self.out.name}.paused")
            _remove(self.path)  # now the old output
        else:
            old = None
            if self.out.exists():
                old = self.parent / f".{self.out.name}.old-{os.getpid()}"
                os.replace(self.out, old)
                _pause("between-renames", self.parent / f".{self.out.name}.paused")
            os.replace(self.path, self.out)
            self.committed = True
            if old is not None:
                _remove(old)
        self.path = None
        return self.out

    def set_aside(self, suffix: str = "failed") -> Path:
        """Keep the uncommitted output for inspection at ``<out>.<suffix>`` (replacing an older
        dsmoe one there) instead of removing it; ``out`` itself is left untouched."""
        assert self.path is not None and not self.committed
        dest = self.out.with_name(f"{self.out.name}.{suffix}")
        if dest.exists():
            if not is_dsmoe_output(dest):
                _remove(self.path)
                self.path = None
                raise DsmoeError(f"{dest} exists and is not a dsmoe output: the failed export was not kept")
            _remove(dest)
        _fix_permissions(self.path)
        os.replace(self.path, dest)
        self.path = None
        return dest

    # ---- leaving -----------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb):
        self._restore_signals()
        self._cleanup()
        code = _errno_of(exc)
        if code in _FULL and not self.committed:
            raise _write_error(self.out, OSError(code, os.strerror(code))) from None
        return False

    def _cleanup(self) -> None:
        if self.path is not None:
            _remove(self.path)
            self.path = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.parent / f".{self.out.name}.lock")
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.committed:
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if still empty

    def _trap_signals(self) -> None:
        def handler(signum, frame):
            raise Interrupted(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            try:
                self._signals[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                break

    def _restore_signals(self) -> None:
        for sig, old in self._signals.items():
            signal.signal(sig, old)
        self._signals.clear()


def check_target(out: Path, *, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Rule 1 of the module docstring, for a command to call before any heavy work."""
    out = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise DsmoeError(f"refusing to write {out}: it is (or holds) the current directory; choose a new --out")
    for src in inputs:
        src = Path(os.path.abspath(src))
        if out == src or out in src.parents:
            raise DsmoeError(f"refusing to write {out}: it is (or holds) this command's input {src}")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise DsmoeError(f"output {out} already exists (use --force to replace it)")
    if out.is_symlink() or not out.is_dir():
        raise DsmoeError(f"refusing to replace {out}: it is not a directory dsmoe wrote; remove it yourself")
    if not is_dsmoe_output(out) and any(out.iterdir()):
        raise DsmoeError(f"refusing to replace {out}: it is not a dsmoe output (no {MARKER}); "
                         "remove it yourself or choose another --out")


def is_dsmoe_output(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in (MARKER, *LEGACY_MARKERS))


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


def _remove(p: Path) -> None:
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
            os.chmod(os.path.join(d, name), 0o666 & ~mask)


def _errno_of(exc: BaseException | None) -> int | None:
    """The errno of a failed write: an OSError's, or the ``os error N`` that libraries writing
    files in Rust or C++ (safetensors, onnx) put in their own exception's message."""
    if isinstance(exc, OSError):
        return exc.errno
    m = re.search(r"os error (\d+)", str(exc)) if exc is not None else None
    return int(m.group(1)) if m else None


def _write_error(out: Path, e: OSError) -> DsmoeError:
    why = _WRITE_ERRNOS.get(e.errno, e.strerror or str(e))
    return DsmoeError(f"cannot write output {out}: {why} (nothing was written)")


def _pause(point: str, flag: Path) -> None:
    """Test hook: with ``DSMOE_TEST_PAUSE_AT=point``, announce the point in ``flag`` and wait
    (a crash-safety test kills the process there)."""
    if os.environ.get(PAUSE_ENV) == point:
        flag.write_text(f"{os.getpid()}\n")
        time.sleep(120)
