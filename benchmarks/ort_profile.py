"""Where a decode step's time goes in ONNX Runtime: the per-node profile of an exported model,
with the weight bytes each node reads and the bandwidth it reaches. Usage::

    .venv/bin/python -m dsmoe.bench.ort_profile EXPORT_DIR [EXPORT_DIR ...] [--past 128] [--steps 16]
        [--threads N] [--accuracy-levels 0 4] [--md FILE]

Each export (any ``dsmoe-export`` directory with a dynamic cache: fp32, ``--quant int8|int4``)
runs ``--steps`` profiled decode steps of one token over a seeded random cache of ``--past``
positions (after 2 unprofiled warm-up steps), in a session opened the way the ``ort`` backend
opens it (:func:`dsmoe.export.runner.session`). Per ONNX op type: kernel time per step, its share,
the weight bytes its nodes read per step (initializers; a routed-expert op — ``QMoE``/``MoE`` —
reads the ``num_experts_per_tok`` of ``n_routed_experts`` experts one token hits, an embedding
``Gather`` one row) and the bandwidth that implies, against the read bandwidth measured in the same run
(:func:`dsmoe.bench.limits.measure_limits`). "outside kernels" is the step's wall time minus the
kernels' (session overhead, copies of the cache). "all weights at bandwidth" is the step if every
op that reads weights ran at the measured bandwidth and the rest took what it took: what the graph
could reach with perfect matmul kernels.

``--accuracy-levels`` profiles each quantized export again with its ``MatMulNBits`` nodes'
``accuracy_level`` rewritten (a copy of ``model.onnx`` beside hard links to the same weights; the
numerics then differ from dsmoe's reference, which emulates level 4): the measurement behind
:data:`dsmoe.export.lower_quant.ACCURACY_LEVEL`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from dsmoe.bench.limits import measure_limits
from dsmoe.bench.report import machine_info
from dsmoe.export.onnx_writer import MODEL_FILE
from dsmoe.export.runner import OrtDecoder, export_target, session
from dsmoe.export.static_cache import PAST_AXIS

from dsmoe import load_config
from dsmoe.cache import cache_layout
from dsmoe.errors import DsmoeError
from dsmoe.outputs import check_output_file, write_output_file

ROUTED_EXPERT_OPS = ("QMoE", "MoE")
MATMUL_NBITS = "MatMulNBits"
WARMUP = 2
WEIGHT_OP_BYTES = 1 << 20   # an op type whose nodes read at least this per step counts as reading weights


def kernel_times(events: list[dict], skip_runs: int = 0) -> dict[str, tuple[str, float]]:
    """``node name -> (op type, ms per run)`` from an ONNX Runtime profile's events, over the runs
    after the first ``skip_runs`` (the warm-up: the profiler is on from the session's start)."""
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    if len(runs) <= skip_runs:
        raise DsmoeError(f"the profile holds {len(runs)} runs; {skip_runs} warm-up runs leave none to count")
    start, calls = runs[skip_runs], len(runs) - skip_runs
    per: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            name = e["name"][: -len("_kernel_time")]
            entry = per.setdefault(name, [e["args"]["op_name"], 0.0])
            entry[1] += e["dur"] / 1e3 / calls
    return {k: (op, ms) for k, (op, ms) in per.items()}


def node_weight_bytes(model_path: Path, active_fraction: float) -> dict[str, int]:
    """Bytes of the initializers each node of the model reads (``active_fraction`` of them for a
    routed-expert op), from the graph alone (the external data is not loaded)."""
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}

    def size(name: str) -> int:
        t = inits.get(name)
        if t is None:
            return 0
        return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize

    out = {}
    for n in m.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].dims:
            out[n.name] = size(n.input[0]) // inits[n.input[0]].dims[0]   # a lookup: one row per token
            continue
        b = sum(size(i) for i in n.input)
        out[n.name] = int(b * active_fraction) if n.op_type in ROUTED_EXPERT_OPS else b
    return out


def _decoder_step(dec, layout, past: int, seed: int, tokens: int):
    """A step of ``tokens`` new tokens through ``dec`` (an in-place :class:`OrtDecoder`) after a
    seeded random cache of ``past`` positions. Decode (one token) goes on from the present each
    step, as generation does (the cache grows by one position per step, nothing is copied); a
    prefill starts from that cache again each call (copied into the bound buffers when ``past`` >
    0, which the step's time then includes)."""
    ids = torch.tensor([[7]]) if tokens == 1 else (torch.arange(tokens)[None] * 7919 + 7) % 100
    state = {"cache": layout.random(1, past, torch.Generator().manual_seed(seed))}

    def step():
        P = state["cache"][0][0].shape[2]
        mask, pos = torch.ones(1, P + tokens, dtype=torch.int64), torch.arange(P, P + tokens)[None]
        _, present = dec(ids, mask, pos, state["cache"])
        if tokens == 1:
            state["cache"] = present
    return step


def _decode_feeds(sess, layout, past: int, seed: int, tokens: int = 1) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids = np.array([[7]], dtype=np.int64) if tokens == 1 else (np.arange(tokens, dtype=np.int64)[None] * 7919 + 7) % 100
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, past + tokens), dtype=np.int64),
             "position_ids": np.arange(past, past + tokens, dtype=np.int64)[None]}
    types = {i.name: i.type for i in sess.get_inputs()}
    flat = [t for layer in layout.random(1, past, g) for t in layer]
    for name, t in zip(layout.input_names(), flat):
        feeds[name] = t.numpy().astype(np.float16 if types[name] == "tensor(float16)" else np.float32)
    return feeds


def with_accuracy_level(src: Path, level: int, into: Path) -> Path:
    """A copy of the export ``src`` in ``into`` whose ``MatMulNBits`` nodes run at ``level`` (the
    other files are hard links to ``src``'s where the filesystem allows, else copies: ONNX Runtime
    refuses external data behind a symbolic link that leaves the model's directory)."""
    m = onnx.load(str(src / MODEL_FILE), load_external_data=False)
    nbits = [n for n in m.graph.node if n.op_type == MATMUL_NBITS]
    if not nbits:
        raise DsmoeError(f"{src / MODEL_FILE} has no {MATMUL_NBITS} nodes: there is no accuracy level to change "
                         "(an unquantized export, or --quant-scope experts with no dense layer)")
    into.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != MODEL_FILE and f.is_file():
            try:
                os.link(f, into / f.name)
            except OSError:
                shutil.copy2(f, into / f.name)
    for n in nbits:
        for a in n.attribute:
            if a.name == "accuracy_level":
                a.i = level
    onnx.save(m, str(into / MODEL_FILE))
    return into


def accuracy_sweep(d: Path, levels: list[int], *, past: int, steps: int, threads: int) -> list[dict]:
    """The quantized export ``d`` at each ``MatMulNBits`` accuracy level: wall and MatMulNBits ms."""
    tmp = Path(tempfile.mkdtemp(prefix=".dsmoe-acc-", dir=d.parent))  # beside it: hard links
    try:
        rows = []
        for lvl in levels:
            r = profile_export(with_accuracy_level(d, lvl, tmp / f"level{lvl}"), past=past, steps=steps, threads=threads)
            rows.append({"accuracy_level": lvl, "wall_ms": r["wall_ms"], "matmulnbits_ms": r["ops"][MATMUL_NBITS]["ms"]})
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile_export(d: Path, *, past: int, steps: int, threads: int, seed: int = 0, tokens: int = 1,
                   last_logits: bool = False, kv_inplace: bool = False) -> dict:
    """One export's decode step (``tokens`` > 1: a prefill of that many after ``past``): wall time and
    the per-op-type kernel table."""
    if not (d / MODEL_FILE).is_file():
        raise DsmoeError(f"{d} holds no {MODEL_FILE} (profile a dsmoe-export directory)")
    if export_target(d) != "ort":
        raise DsmoeError(f"{d} is a {export_target(d)} export: profile an ort one (ONNX Runtime fuses a portable "
                         "export's DequantizeLinear + MatMul into nodes the graph does not name, so their bytes "
                         "could not be counted)")
    config = load_config(d)
    layout = cache_layout(config)
    tmp = Path(tempfile.mkdtemp(prefix="dsmoe-prof-"))
    try:
        if kv_inplace:  # as generation runs it: OrtDecoder's bound buffers, the cache growing each step
            dec = OrtDecoder(d, threads=threads, logits="last" if last_logits else "all", kv_inplace=True,
                             spinning=False, profile_prefix=str(tmp / "ort"))
            sess, step = dec.sess, _decoder_step(dec, layout, past, seed, tokens)
        else:
            sess = session(d / MODEL_FILE, threads=threads, profile_prefix=str(tmp / "ort"), last_logits=last_logits)
            first = next(i for i in sess.get_inputs() if i.name == layout.input_names()[0])
            if first.shape[2] == PAST_AXIS["static"]:
                raise DsmoeError(f"{d} is a static-cache export; profile a dynamic one (dsmoe-export --kv-cache dynamic)")
            feeds = _decode_feeds(sess, layout, past, seed, tokens)
            fetch = [o.name for o in sess.get_outputs()]

            def step():
                sess.run(fetch, feeds)
        for _ in range(WARMUP):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        events = json.loads(Path(sess.end_profiling()).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nodes = kernel_times(events, skip_runs=WARMUP)
    # routed experts read per step: K of E for one token; for a prefill at most all of them (an upper bound)
    fraction = min(1.0, tokens * config.num_experts_per_tok / config.n_routed_experts) if config.n_routed_experts else 1.0
    weights = node_weight_bytes(d / MODEL_FILE, fraction)
    unseen = [n for n, b in weights.items() if b >= WEIGHT_OP_BYTES and n not in nodes]
    if unseen:  # fused away by ONNX Runtime: their bytes would silently drop out of the floor
        raise DsmoeError(f"{len(unseen)} nodes of {d / MODEL_FILE} that read weights do not appear in the profile "
                         f"(fused by ONNX Runtime: {', '.join(unseen[:3])}); their bytes cannot be attributed")
    by_op: dict[str, dict] = defaultdict(lambda: {"nodes": 0, "ms": 0.0, "bytes": 0})
    for name, (op, ms) in nodes.items():
        row = by_op[op]
        row["nodes"] += 1
        row["ms"] += ms
        row["bytes"] += weights.get(name, 0)
    kernels_ms = sum(r["ms"] for r in by_op.values())
    model = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.n_routed_experts} experts "
             f"top-{config.num_experts_per_tok}, vocabulary {config.vocab_size}")
    return {"export": str(d), "model": model, "quant": _quant(d), "tokens": tokens, "kv_inplace": kv_inplace,
            "last_logits": last_logits,
            "wall_ms": wall_ms, "kernels_ms": kernels_ms,
            "weight_bytes": sum(r["bytes"] for r in by_op.values()),
            "ops": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms"]))}


def _quant(d: Path) -> str:
    report = json.loads((d / "export_report.json").read_text()) if (d / "export_report.json").is_file() else {}
    q = report.get("quant")
    return f"int{q['scheme']['bits']}" if q else "fp32"


def markdown(runs: list[dict], *, bandwidth_gbs: float, machine: dict, past: int, steps: int, threads: int) -> str:
    lines = [f"# ONNX Runtime decode profile — {machine['cpu']} ({machine['cores']} cores)", "",
             f"- One step of {runs[0].get('tokens', 1)} token(s) (past {past}, batch 1), {WARMUP} warm-up + {steps} profiled steps, "
             f"{threads} threads; "
             + ("run as `dsmoe generate` runs it (`OrtDecoder`: keys/values written in place, decode going on from "
                "its present; threads not spinning)" if runs[0].get("kv_inplace") else "session as the `ort` backend opens it")
             + (", logits of the last position only" if runs[0].get("last_logits") else "")
             + "; wall time includes the profiler's overhead.",
             f"- Read bandwidth measured in this run: {bandwidth_gbs:.2f} GB/s. `GB/s` = the weight bytes an op's "
             "nodes read per step ÷ its kernel time (routed experts: the K of E experts a token hits).", ""]
    for r in runs:
        floor = r["weight_bytes"] / bandwidth_gbs / 1e6
        heavy = [row for row in r["ops"].values() if row["bytes"] >= WEIGHT_OP_BYTES]
        rest = r["wall_ms"] - sum(row["ms"] for row in heavy)
        best = sum(row["bytes"] for row in heavy) / bandwidth_gbs / 1e6 + rest
        lines += [f"## {r['quant']}: `{Path(r['export']).name}` ({r['model']})", "",
                  f"wall {r['wall_ms']:.2f} ms per step, kernels {r['kernels_ms']:.2f} ms, outside kernels "
                  f"{r['wall_ms'] - r['kernels_ms']:.2f} ms; weights read {r['weight_bytes'] / 1e6:.1f} MB "
                  f"(floor {floor:.2f} ms, {100 * floor / r['wall_ms']:.0f}% of the step); all weights at bandwidth: "
                  f"{best:.2f} ms ({100 * floor / best:.0f}% of floor; the ops without weights and "
                  f"the session take {rest:.2f} ms)", "",
                  "| op | nodes | ms/step | share | weights MB | GB/s | of bandwidth |", "|---|---|---|---|---|---|---|"]
        for op, row in r["ops"].items():
            gbs = row["bytes"] / row["ms"] / 1e6 if row["bytes"] and row["ms"] else 0.0
            rate = f"{gbs:.1f}" if row["bytes"] else "—"
            frac = f"{100 * gbs / bandwidth_gbs:.0f}%" if row["bytes"] else "—"
            lines.append(f"| {op} | {row['nodes']} | {row['ms']:.3f} | {100 * row['ms'] / r['kernels_ms']:.1f}% | "
                         f"{row['bytes'] / 1e6:.1f} | {rate} | {frac} |")
        lines.append("")
        if r.get("accuracy_levels"):
            lines += ["MatMulNBits `accuracy_level` (the same weights; 4 is what dsmoe exports):", "",
                      "| accuracy_level | step | MatMulNBits |", "|---|---|---|"]
            lines += [f"| {a['accuracy_level']} | {a['wall_ms']:.2f} ms | {a['matmulnbits_ms']:.2f} ms |" for a in r["accuracy_levels"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1, help="new tokens per step: 1 = decode, more = a prefill after --past")
    ap.add_argument("--last-logits", action="store_true", help="the lm_head on the last position only (OrtDecoder(logits='last'))")
    ap.add_argument("--kv-inplace", action="store_true",
                    help="keys/values written in place, as generation runs them (OrtDecoder(kv_inplace=True))")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--accuracy-levels", type=int, nargs="*", default=[],
                    help="also profile each quantized export at these MatMulNBits accuracy levels")
    ap.add_argument("--md", type=Path, help="also write the tables to this markdown file (and FILE.json)")
    ap.add_argument("--force", action="store_true", help="replace --md (and FILE.json) if they exist")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.past < 0 or args.threads < 1 or args.tokens < 1:
        ap.error("--steps, --tokens and --threads take a number >= 1, --past one >= 0")
    try:
        _run(args)
    except DsmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args) -> None:
    if args.md:  # before the profiling, not after
        for p in (args.md, args.md.with_suffix(".json")):
            check_output_file(p, force=args.force, inputs=args.exports, option="--md")
    runs = [profile_export(d, past=args.past, steps=args.steps, threads=args.threads, tokens=args.tokens,
                           last_logits=args.last_logits, kv_inplace=args.kv_inplace) for d in args.exports]
    for r in runs:
        if args.accuracy_levels and r["quant"] != "fp32":
            r["accuracy_levels"] = accuracy_sweep(Path(r["export"]), args.accuracy_levels, past=args.past,
                                                  steps=args.steps, threads=args.threads)
    limits = measure_limits()
    machine = machine_info(args.threads)
    text = markdown(runs, bandwidth_gbs=limits.bandwidth_gbs, machine=machine, past=args.past, steps=args.steps,
                    threads=args.threads)
    print(text)
    if args.md:
        write_output_file(args.md, text, force=args.force, inputs=args.exports, option="--md")
        write_output_file(args.md.with_suffix(".json"), json.dumps({"machine": machine, "limits": limits.as_dict(),
                                                                    "past": args.past, "steps": args.steps, "runs": runs},
                                                                   indent=2) + "\n", force=args.force, inputs=args.exports,
                          option="--md")


if __name__ == "__main__":
    main()
