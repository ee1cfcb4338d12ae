"""Where the time goes in the `moe-layer` suite: torch profiler for eager and fused, ONNX Runtime's
own per-node profile for ort. Usage::

    .venv/bin/python -m dsmoe.bench.profile_moe_layer [--preset deepseek-moe-16b] [--tokens 1 32] [--iters 5]

Prints, per T, the top operators of each backend (self time) and ORT's time per node type.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import onnxruntime as ort
import torch
from dsmoe.bench.backends import REGISTRY, _scratch, layer_onnx
from dsmoe.bench.ort_profile import kernel_times
from dsmoe.bench.suites import moe_layer_workload
from torch.profiler import ProfilerActivity, profile


def torch_top(fn, x, iters: int, rows: int = 8) -> str:
    with torch.inference_mode():
        fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def ort_nodes(w, x_by_t: dict[int, torch.Tensor], iters: int, threads: int) -> dict[int, dict[str, float]]:
    tmp = _scratch()
    try:
        layer_onnx(w, tmp / "layer.onnx")
        out = {}
        for T, x in x_by_t.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.enable_profiling, so.profile_file_prefix = True, str(tmp / f"prof-{T}")
            sess = ort.InferenceSession(str(tmp / "layer.onnx"), so, providers=["CPUExecutionProvider"])
            for _ in range(iters + 1):
                sess.run(None, {"x": x.numpy()})
            per = Counter()
            for op, ms in kernel_times(json.loads(Path(sess.end_profiling()).read_text()), skip_runs=1).values():
                per[op] += ms
            out[T] = dict(per.most_common())
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-moe-16b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = moe_layer_workload(f"preset:{args.preset}", {}, args.tokens)
    fused = REGISTRY["fused"].prepare(w, args.threads).fn
    xs = {T: torch.randn(T, w.config.hidden_size, generator=torch.Generator().manual_seed(1000 + T)) for T in args.tokens}
    for T, x in xs.items():
        print(f"\n=== T={T}: eager (torch profiler, {args.iters} calls) ===")
        print(torch_top(w.eager, x, args.iters))
        print(f"=== T={T}: fused ===")
        print(torch_top(fused, x, args.iters))
    for T, per in ort_nodes(w, xs, args.iters, args.threads).items():
        total = sum(per.values())
        print(f"\n=== T={T}: ort, ms per call by node type (kernel time; total {total:.1f} ms) ===")
        for op, ms in per.items():
            print(f"  {op:12s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
