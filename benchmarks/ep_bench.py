"""Expert parallelism on this machine: step time, bytes moved and memory per rank for 1/2/4 processes.

    .venv/bin/python -m benchmarks.ep_bench [--preset small] [--out benchmarks/results]

Each configuration is one launch of torchrun's launcher (gloo); every rank builds its shard
(:func:`dsmoe.app.ep_rank.run_rank`'s steps), then decodes ``PROMPTS`` prompts per rank (data-
parallel attention) or all of them on every rank (replicated attention), ``WARM`` steps of warm-up
excluded. A 2-core machine cannot show a speed-up (N processes share 2 cores); the point is the
communication volume and its overhead per step. Results name the machine; the load average
before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from dsmoe.passes.context import PassContext
from dsmoe.passes.shard_experts import ExpertShard, shard_experts
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

import dsmoe
from dsmoe.app.ep_load import load_rank_model
from dsmoe.app.ep_placement import contiguous_placement
from dsmoe.app.ep_rank import _rss
from dsmoe.app.generate import fused_step, greedy_generate_batch
from dsmoe.distributed import ExpertComm

PROMPT_LEN, NEW, WARM = 16, 9, 2


def worker(preset: str, mode: str, prompts: int) -> dict:


    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    config = dsmoe.load_config(f"preset:{preset}")
    p = contiguous_placement(config.moe_layers, config.n_routed_experts, world)
    model, _ = load_rank_model(f"preset:{preset}", p, rank)
    gm = fused_step(model)
    del model
    comm = ExpertComm(dist.group.WORLD, "a2a" if mode == "none" else mode)
    if mode != "none":
        shard_experts(gm, PassContext(expert_shard=ExpertShard(comm, p)))
    g = torch.Generator().manual_seed(rank if mode == "a2a" else 0)
    batch = [torch.randint(3, config.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(prompts)]
    times: list[float] = []

    def step(*args):
        t = time.perf_counter()
        out = gm(*args)
        times.append(time.perf_counter() - t)
        return out
    greedy_generate_batch(step, config, batch, NEW)
    tr = comm.traffic
    res = {"rank": rank, "params": sum(q.numel() for q in gm.parameters()),
           "param_bytes": sum(q.numel() * q.element_size() for q in gm.parameters()), "rss_bytes": _rss(),
           "prefill_s": times[0], "decode_s": statistics.median(times[1 + WARM:]),
           "bytes_per_step": (tr.dispatch + tr.combine + tr.counts + tr.allreduce) / max(1, len(times)),
           "traffic": vars(tr), "steps": len(times), "tokens": prompts}
    dist.destroy_process_group()
    return res


def launch(nproc: int, preset: str, mode: str, prompts: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5, start_method="spawn")
    return elastic_launch(cfg, worker)(preset, mode, prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--machine", default="AMD EPYC (Zen 4) 2-core VM, AVX-512/VNNI")
    ap.add_argument("--tag", default="amd-epyc-2c")
    a = ap.parse_args()
    load0 = os.getloadavg()
    runs = []
    # (processes, mode, prompts per rank): one process without EP is the baseline; DP attention
    # gives every rank 2 sequences; replicated attention runs all 2·N on every rank.
    for n, mode, per in ((1, "none", 2), (1, "a2a", 2), (2, "a2a", 2), (2, "allreduce", 4), (4, "a2a", 2)):
        t = time.perf_counter()
        ranks = launch(n, a.preset, mode, per)
        runs.append({"processes": n, "mode": mode, "prompts_per_rank": per, "wall_s": time.perf_counter() - t,
                     "ranks": [ranks[r] for r in sorted(ranks)]})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "ranks"}), flush=True)
    doc = {"machine": a.machine, "preset": a.preset, "dtype": "float32", "backend": "gloo", "prompt_len": PROMPT_LEN,
           "new_tokens": NEW, "warmup_steps": WARM, "load_before": load0, "load_after": os.getloadavg(), "runs": runs}
    out = Path(a.out)
    stem = f"{a.tag}-ep-{a.preset}"
    _write(out / f"{stem}.json", json.dumps(doc, indent=2) + "\n")
    _write(out / f"{stem}.md", markdown(doc))


def markdown(doc: dict) -> str:
    lines = [f"# Expert parallelism on {doc['machine']}",
             "",
             f"Preset `{doc['preset']}`, {doc['dtype']}, torch.distributed {doc['backend']}, prompts of "
             f"{doc['prompt_len']} tokens, {doc['new_tokens']} greedy steps ({doc['warmup_steps']} decode steps of "
             f"warm-up excluded from the median). Load average before {doc['load_before'][0]:.1f}, after "
             f"{doc['load_after'][0]:.1f} (a shared machine: absolute times are noisy; the bytes are exact).",
             "",
             "| processes | mode | sequences/rank | decode step (median, ms) | prefill (ms) | bytes handed to collectives "
             "per step per rank | parameters/rank (M) | RSS/rank (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        rk = r["ranks"]
        lines.append(f"| {r['processes']} | {r['mode']} | {r['prompts_per_rank']} | "
                     f"{max(x['decode_s'] for x in rk) * 1e3:.1f} | {max(x['prefill_s'] for x in rk) * 1e3:.1f} | "
                     f"{statistics.mean(x['bytes_per_step'] for x in rk):,.0f} | "
                     f"{statistics.mean(x['params'] for x in rk) / 1e6:.2f} | "
                     f"{statistics.mean(x['rss_bytes'] for x in rk) / 2**20:.0f} |")
    lines += ["", "`none`: the single-process fused graph (no expert parallelism). `a2a`: data-parallel attention, "
              "dispatch/combine by all_to_all_single. `allreduce`: replicated attention, one all_reduce per MoE layer.",
              "Step times are the slowest rank's. Bytes per step average the prefill and decode steps. The prefill "
              "is the first step: it includes gloo's connection set-up on the first collective, and N processes share "
              "2 cores, so no speed-up can show here; the bytes and the parameters per rank are the point.",
              "Bytes per step per rank, by hand: a2a = tokens/step × 3 MoE layers × K=6 × (512·4·2 + 8) + 3 × N·8 (split sizes); "
              "allreduce = tokens/step of all 4 sequences × 3 × 512 · 4.", ""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rerender(path: str) -> None:
    """Rewrite the Markdown of a results JSON (after a change of the table's text)."""
    doc = json.loads(Path(path).read_text())
    _write(Path(path).with_suffix(".md"), markdown(doc))


if __name__ == "__main__":
    main()
