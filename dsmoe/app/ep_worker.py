"""One worker of ``dsmoe generate --ep N`` (started by torchrun's launcher: ``python -m dsmoe.app.ep_worker
SPEC.json DIR``). It joins the process group torchrun describes in the environment, runs
:func:`dsmoe.app.ep_rank.run_rank`, and rank 0 writes ``DIR/result.json``. A failure writes
``DIR/rank{R}.err`` (one line, and whether it is a *consequence* of another rank's failure, a
broken or timed-out collective) and exits non-zero: 2 for a user error, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def init_group(spec: dict):
    import torch.distributed as dist

    from dsmoe.app.ep import timeout_of
    backend = "nccl" if str(spec.get("device", "cpu")).startswith("cuda") else "gloo"
    if backend == "nccl":
        import torch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timeout_of(spec))
    return dist.group.WORLD


def run_and_close(spec: dict, group) -> dict:
    import torch.distributed as dist

    from dsmoe.app.ep_rank import run_rank
    try:
        result = run_rank(spec, group)
        dist.barrier(group)  # no rank tears its sockets down while another still reads the last collective
        return result
    finally:
        dist.destroy_process_group()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    spec_path, out = Path(argv[0]), Path(argv[1])
    rank = int(os.environ.get("RANK", 0))
    spec = json.loads(spec_path.read_text())
    try:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = run_and_close(spec, init_group(spec))
        if rank == 0:
            _write(out / "result.json", json.dumps(result))
        return 0
    except BaseException as e:  # every failure becomes one line for the launcher
        from dsmoe.errors import DsmoeError
        consequence = _is_collective(e)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if not isinstance(e, DsmoeError):
            msg = f"{type(e).__name__}: {msg}"
        code = getattr(e, "exit_code", 2) if isinstance(e, DsmoeError) else 1
        _write(out / f"rank{rank}.err", json.dumps({"rank": rank, "error": msg, "consequence": consequence,
                                                    "time": time.time(), "exit": code}))
        return code


def _is_collective(e: BaseException) -> bool:
    """A collective that broke because another rank went away, or timed out waiting for one."""
    import torch.distributed as dist
    names = (getattr(dist, "DistError", ()), getattr(dist, "DistBackendError", ()), getattr(dist, "DistNetworkError", ()))
    if isinstance(e, tuple(n for n in names if n)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("gloo", "connection", "timed out", "timeout", "nccl",
                                                                     "peer", "socket"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
