"""``dsmoe generate … --ep N``: one model over N processes with expert parallelism.

Launching is torch's own: N local workers through ``torch.distributed.run``'s launcher (torchrun's
argument parser, ``config_from_args`` and ``elastic_launch``, standalone rendezvous, no restarts),
each running :mod:`dsmoe.app.ep_worker`; their output goes to log files in a private temporary
directory, and the parent prints the tokens, or one line naming the failed rank and its cause.
Under an outside ``torchrun`` (several machines; ``WORLD_SIZE`` set in the environment) ``dsmoe
generate --ep N`` *is* the worker: it joins the group torchrun set up and rank 0 prints.

Backend gloo on the CPU, NCCL with ``--device cuda``. Every collective has the group's timeout
(``--ep-timeout``); when a rank dies or fails, the launcher stops the others (SIGTERM, then SIGKILL).
The ONNX targets stay single-process: an exported ONNX/TensorRT model is one graph with every
expert inside one ``com.microsoft.MoE``/plugin node and has no collective ops to place between them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import click

from dsmoe.errors import DsmoeError

ATTENTION = {"dp": "a2a", "replicated": "allreduce"}
SELF_KEYS = ("source", "prompts", "max_new_tokens", "dtype", "overrides", "device", "placement", "redundant", "mode",
             "absorb_mla", "timeout")


def ep_options(f):
    """The ``--ep`` options of ``dsmoe generate`` (one decorator: cli.py stays untouched otherwise)."""
    for opt in reversed([
        click.option("--ep", type=int, default=None, metavar="N",
                     help="expert parallelism: N processes (torchrun; gloo on cpu, NCCL on cuda), fused graph"),
        click.option("--placement", "ep_placement", default=None, metavar="FILE",
                     help="--ep: experts per rank from `dsmoe experts --place N --json` [default: contiguous]"),
        click.option("--redundant-experts", "ep_redundant", type=int, default=0, show_default=True, metavar="R",
                     help="--ep: R extra replicas per layer of the hottest experts (needs --placement)"),
        click.option("--ep-attention", type=click.Choice(list(ATTENTION)), default="dp", show_default=True,
                     help="--ep: dp = each rank decodes its own prompts (all-to-all); replicated = all-reduce"),
        click.option("--ep-timeout", type=float, default=120.0, show_default=True, metavar="S",
                     help="--ep: seconds any collective may wait before every rank stops"),
    ]):
        f = opt(f)
    return f


def ep_kwargs(ep, ep_placement, ep_redundant, ep_attention, ep_timeout) -> dict:
    """The ``--ep`` options as :func:`run_generate_ep` keywords; options given without ``--ep`` are refused."""
    if ep is None:
        given = [f for f, v in (("--placement", ep_placement), ("--redundant-experts", ep_redundant),
                                ("--ep-attention", ep_attention != "dp"), ("--ep-timeout", ep_timeout != 120.0)) if v]
        if given:
            raise DsmoeError(f"{', '.join(given)}: only with --ep N (expert parallelism)")
        return {}
    return dict(ep=ep, placement=ep_placement, redundant=ep_redundant, mode=ATTENTION[ep_attention], timeout=ep_timeout)


def run_generate_ep(*, ep: int, source: str, prompt_ids, prompt=None, max_new_tokens: int = 16, backend: str = "eager",
                    dtype=None, overrides=None, device: str = "cpu", placement=None, redundant: int = 0,
                    mode: str = "a2a", timeout: float = 120.0, absorb_mla: bool = True, **unused) -> tuple[list, str | None]:
    """Generate with ``ep`` processes; returns ``(ids per prompt, text)`` like :func:`run_generate`."""
    import dsmoe
    from dsmoe.app.generate import _prompts, check_request
    if ep < 1:
        raise DsmoeError(f"--ep needs a positive number of processes, got {ep}")
    if backend not in ("eager", "fused"):
        raise DsmoeError(f"--ep runs the fused PyTorch graph; the {backend} backend (an ONNX/TensorRT export) is "
                         "single-process: drop --backend or use --backend fused")
    bad = [f for f, v in unused.items() if v not in (None, False, "reference")]
    if bad:
        raise DsmoeError(f"{', '.join('--' + b.replace('_', '-') for b in bad)} do(es) not apply with --ep")
    if timeout <= 0:
        raise DsmoeError(f"--ep-timeout must be positive, got {timeout}")
    prompts, tok = _prompts(source, prompt_ids, prompt, None)
    config = dsmoe.load_config(source, overrides)
    for p in prompts:
        check_request(config, p, max_new_tokens)
    from dsmoe.app.ep_rank import make_placement
    before = make_placement(config, ep, placement, 0)  # refuse a bad placement before launching anything
    after = make_placement(config, ep, placement, redundant)
    if before.busiest_share() is not None:
        dsmoe.log.info(f"busiest rank's share of the measured expert load: {before.busiest_share():.3f}"
                       + (f" → {after.busiest_share():.3f} with {redundant} redundant experts per layer" if redundant
                          else "") + f" (even split: {1 / ep:.3f})")
    spec = dict(source=source, prompts=prompts, max_new_tokens=max_new_tokens, dtype=dtype, overrides=overrides or {},
                device=device, placement=placement and str(Path(placement).resolve()), redundant=redundant, mode=mode,
                absorb_mla=absorb_mla, timeout=timeout)
    if "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return _as_worker(spec, ep, tok)
    result = launch(spec, ep)
    ids = result["ids"]
    return ids, (tok.decode(ids[0]) if tok is not None else None)


def launch(spec: dict, nproc: int) -> dict:
    """Run ``spec`` on ``nproc`` local workers through torchrun's launcher; rank 0's result document."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    with tempfile.TemporaryDirectory(prefix="dsmoe-ep-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                             "--monitor-interval=0.2", f"--log-dir={tmp}/logs", "--redirects=3",
                                             "-m", "dsmoe.app.ep_worker", str(spec_path), tmp])
        args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"
        args.rdzv_id = os.path.basename(tmp)
        quiet = logging.getLogger("torch.distributed")
        level, quiet.level = quiet.level, logging.CRITICAL
        old_omp = os.environ.get("OMP_NUM_THREADS")
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        try:
            config, cmd, cmd_args = config_from_args(args)
            elastic_launch(config, cmd)(*cmd_args)
        except ChildFailedError as e:
            message, code = _cause(Path(tmp), e.failures)
            err = EpFailure(message)
            err.exit_code = code
            raise err from None
        finally:
            quiet.setLevel(level)
            if old_omp is None:
                os.environ.pop("OMP_NUM_THREADS", None)
        return json.loads((Path(tmp) / "result.json").read_text())


class EpFailure(DsmoeError):
    exit_code = 1


def _cause(tmp: Path, failures: dict) -> tuple[str, int]:
    """One line and an exit status: a rank killed by a signal (not the launcher's SIGTERM), else the
    rank that failed first for a reason of its own (not a collective broken by another rank's
    failure); 2 when that was a user error (a rank refusing), else 1."""
    notes = {}
    for f in tmp.glob("rank*.err"):
        d = json.loads(f.read_text())
        notes[d["rank"]] = d
    for rank, pf in sorted(failures.items()):  # keyed by global rank
        if pf.exitcode < 0 and -pf.exitcode != signal.SIGTERM:
            return f"rank {rank} died: killed by {signal.Signals(-pf.exitcode).name}", 1
    own = sorted((d for d in notes.values() if not d["consequence"]), key=lambda d: d["time"])
    if own:
        return f"rank {own[0]['rank']} failed: {own[0]['error']}", own[0].get("exit", 1)
    silent = sorted(r for r in failures if r not in notes)
    if notes and silent:  # every error is a broken or timed-out collective, and some rank said nothing: it hung
        first = min(notes.values(), key=lambda d: d["time"])
        return (f"rank {silent[0]} stopped answering: rank {first['rank']}'s collective gave up on it "
                f"({first['error'][:160]})"), 1
    if notes:
        first = min(notes.values(), key=lambda d: d["time"])
        return f"rank {first['rank']} failed: {first['error']}", 1
    rank = min(failures)
    return f"rank {rank} exited with code {failures[rank].exitcode}", 1


def _as_worker(spec: dict, ep: int, tok):
    """Inside an outside torchrun: join its group, decode, print on rank 0, exit quietly elsewhere."""
    from dsmoe.app.ep_worker import init_group, run_and_close

    world = int(os.environ["WORLD_SIZE"])
    if world != ep:
        raise DsmoeError(f"--ep {ep} but torchrun started {world} processes (WORLD_SIZE): they must agree")
    group = init_group(spec)
    out = run_and_close(spec, group)
    if int(os.environ["RANK"]) != 0:
        sys.exit(0)
    return out["ids"], (tok.decode(out["ids"][0]) if tok is not None else None)


def timeout_of(spec: dict) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(spec.get("timeout") or 120.0))
