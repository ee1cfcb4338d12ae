"""Child processes that never outlive the command that started them.

:func:`run_child` is :func:`subprocess.run` for dsmoe's own children (llama.cpp's tools, nvcc, an
export in a fresh interpreter):

- the child leads its own process group, so everything it starts can be signalled at once;
- while it runs, the signals that end a command (:data:`dsmoe.outputs.STOP_SIGNALS`) are trapped:
  the child's whole group gets SIGTERM (so a dsmoe child removes its temporaries), then SIGKILL
  after a grace period, and the command ends with :class:`dsmoe.outputs.Interrupted` (exit
  ``128 + n``); a timeout or any other error in the parent does the same;
- on Linux the child also gets SIGKILL when the parent dies without a chance to clean up
  (``PR_SET_PDEATHSIG``: the parent was SIGKILLed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Sequence

from dsmoe.outputs import trapped_signals

GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def kill_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the child's process group, SIGKILL if it is still there after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(argv: Sequence[str], *, timeout: float | None = None, capture_output: bool = True, text: bool = True,
              cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion like ``subprocess.run(argv, capture_output=..., text=...)``;
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds — with the child's group gone, always."""
    pipe = subprocess.PIPE if capture_output else None
    with trapped_signals():
        proc = subprocess.Popen(list(argv), stdout=pipe, stderr=pipe, text=text, cwd=cwd, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            kill_group(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
