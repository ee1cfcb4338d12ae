"""What one rank of ``dsmoe generate --ep N`` does: agree with the others, build its shard, decode.

1. The placement (contiguous, ``--placement FILE``, ``--redundant-experts R``) is built on every
   rank the same way; the ranks then compare digests of the checkpoint (its config and every
   safetensors file's name, size and header), the config, the placement and the run options
   (``all_gather_object``): any disagreement stops every rank before a weight is read.
2. The rank loads the shared parts and only its experts (:mod:`dsmoe.app.ep_load`), captures the
   model, runs the pass pipeline and then :func:`dsmoe.passes.shard_experts.shard_experts`.
3. Decoding: with data-parallel attention (``a2a``, the default) rank ``r`` decodes prompts
   ``r, r+N, …`` (a rank without a prompt decodes a one-token filler and drops it: every rank
   must take part in every step's collectives); with replicated attention (``allreduce``) every
   rank decodes every prompt. Rank 0 gathers the tokens. The step function keeps
   :mod:`dsmoe.app.generate`'s contract, so :func:`greedy_generate` drives it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

import dsmoe
from dsmoe.app.ep_load import load_rank_model
from dsmoe.app.ep_placement import add_redundant, contiguous_placement, read_placement
from dsmoe.checkpoint import shard_files
from dsmoe.errors import DsmoeError

FAULT_ENV = "DSMOE_EP_FAULT"  # tests only: "RANK:STEP[:hang]" makes that rank SIGKILL itself (or hang) before that step


def make_placement(config, world: int, placement_file: str | None, redundant: int):
    layers, E = config.moe_layers, config.n_routed_experts
    if not layers:
        raise DsmoeError("--ep needs a model with routed experts (this config has no MoE layer)")
    p = read_placement(placement_file, layers, E, world) if placement_file else contiguous_placement(layers, E, world)
    return add_redundant(p, redundant)


def checkpoint_digest(source: str) -> str:
    """A preset's name; for a directory, its config.json and each safetensors file's name and size,
    and its bytes: all of them up to 64 MiB, else the header and 64 blocks of 64 KiB spread evenly
    over the file (cheap on a 700 GB checkpoint; catches another checkpoint, not a single flipped weight)."""
    h = hashlib.sha256()
    if dsmoe.is_preset(source):
        h.update(source.encode())
        return h.hexdigest()[:16]
    p = Path(source)
    h.update((p / "config.json").read_bytes())
    for f in shard_files(p):
        size = f.stat().st_size
        h.update(f.name.encode() + struct.pack("<Q", size))
        with f.open("rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
                continue
            n = struct.unpack("<Q", fh.read(8))[0]
            h.update(fh.read(min(n, 64 << 20)))
            for i in range(64):
                fh.seek(8 + n + (size - 8 - n - (64 << 10)) * i // 63)
                h.update(fh.read(64 << 10))
    return h.hexdigest()[:16]


def agree(group, parts: dict[str, str]) -> None:
    """Every rank's ``parts`` digests must equal rank 0's; else every rank raises, naming the part."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, parts, group=group)
    for r, theirs in enumerate(everyone):
        for what in parts:
            if theirs.get(what) != everyone[0].get(what):
                raise DsmoeError(f"rank {r} disagrees with rank 0 on the {what} (digest {theirs.get(what)} vs "
                                 f"{everyone[0].get(what)}): every rank must run the same checkpoint, config, "
                                 "placement and options")


def run_rank(spec: dict, group, *, placement=None) -> dict:
    """Decode on this rank; returns ``{"ids", "traffic", "params", ...}`` (``ids`` complete on rank 0).
    ``placement`` overrides the spec's (the tests use it to make ranks disagree)."""
    from dsmoe.app.generate import _generate, fused_step
    from dsmoe.distributed import ExpertComm
    from dsmoe.passes.context import PassContext
    from dsmoe.passes.shard_experts import ExpertShard, shard_experts

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    source, overrides = spec["source"], spec.get("overrides") or {}
    config = dsmoe.load_config(source, overrides)
    placement = placement or make_placement(config, world, spec.get("placement"), spec.get("redundant", 0))
    run = {k: spec.get(k) for k in ("dtype", "mode", "max_new_tokens", "prompts", "absorb_mla")}
    agree(group, {"checkpoint": checkpoint_digest(source),
                  "config": hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16],
                  "placement": placement.digest(),
                  "options": hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]})
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cuda":
        from dsmoe.app.device import require_cuda_kernels
        require_cuda_kernels()
    t0 = time.perf_counter()
    model, read = load_rank_model(source, placement, rank, dtype=spec.get("dtype"), overrides=overrides, device=device)
    mdtype = next(p for p in model.parameters()).dtype
    gm = fused_step(model, absorb_mla=spec.get("absorb_mla", True))
    del model
    comm = ExpertComm(group, spec.get("mode", "a2a"))
    res = shard_experts(gm, PassContext(expert_shard=ExpertShard(comm, placement)))
    if res.rewrites != len(config.moe_layers):
        raise DsmoeError(f"shard_experts rewrote {res.rewrites} of {len(config.moe_layers)} MoE layers: {res.skipped}")
    build_s = time.perf_counter() - t0
    prompts = spec["prompts"]
    mine = list(range(rank, len(prompts), world)) if comm.mode == "a2a" else list(range(len(prompts)))
    # Every rank must make the same number of forward calls (each MoE layer is a collective). The
    # engine's calls depend only on how many sequences it runs (each prefilled alone, one decode step
    # per further token, all with the same max_new_tokens): a rank with fewer prompts runs one-token
    # fillers whose tokens are dropped.
    per_rank = -(-len(prompts) // world) if comm.mode == "a2a" else len(prompts)
    todo = [prompts[i] for i in mine]
    todo += [prompts[0][:1]] * (per_rank - len(todo))
    times: list[float] = []
    step = _timed(_faulty(gm, rank), times)
    new = _generate(step, config, todo, spec["max_new_tokens"], dtype=mdtype, device=device)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "rows": mine, "ids": new if mine else [],
                                      "traffic": asdict(comm.traffic), "params": sum(p.numel() for p in gm.parameters()),
                                      "local_experts": {layer: placement.local(layer, rank) for layer in placement.layers},
                                      "read_bytes": read["read_bytes"], "rss_bytes": _rss(), "build_s": build_s,
                                      "step_s": times}, group=group)
    ids: list = [None] * len(prompts)
    for g in gathered:
        for i, row in zip(g["rows"], g["ids"]):
            ids[i] = row
    return {"ids": ids, "ranks": gathered, "busiest_share": placement.busiest_share(),
            "placement": placement.to_json()}


def _faulty(step, rank: int):
    want = os.environ.get(FAULT_ENV)
    if not want:
        return step
    r, at, *how = want.split(":")
    calls = [0]

    def wrapped(*args):
        calls[0] += 1
        if rank == int(r) and calls[0] == int(at):
            if how == ["hang"]:
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*args)
    return wrapped


def _timed(step, times: list):
    def wrapped(*args):
        t = time.perf_counter()
        out = step(*args)
        times.append(time.perf_counter() - t)
        return out
    return wrapped


def _rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
