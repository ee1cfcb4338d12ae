"""The planner's table for DeepSeek-V3 on 8/16/32/64 H200s (8 per node, InfiniBand 400G between nodes).

    .venv/bin/python -m benchmarks.ep_plan_table   # writes benchmarks/results/plan-deepseek-v3-h200.{json,md}

A prediction from nominal datasheet rates (``dsmoe plan``), not a measurement: no GPU ran it.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.ep_bench import _write
from dsmoe.app.plan_model import GPUS, a2a_bytes_per_token, a2a_seconds
from dsmoe.app.plan_run import run_plan

CONFIG = "benchmarks/configs/deepseek-v3/config.json"
COMMON = dict(gpu="h200", interconnect="ib-400g", weights="fp8", dispatch_dtype="fp8", combine_dtype="bf16",
              batch=128, context=4096, chunk=4096)


def main() -> None:
    rows = [run_plan(source=CONFIG, gpus=n, nodes=max(1, n // 8), **COMMON) for n in (8, 16, 32, 64)]
    out = Path("benchmarks/results")
    _write(out / "plan-deepseek-v3-h200.json", json.dumps({"assumptions": COMMON, "plans": rows}, indent=2) + "\n")
    lines = ["# `dsmoe plan`: DeepSeek-V3 on H200s (prediction, not a measurement)", "",
             "Config `benchmarks/configs/deepseek-v3/config.json` (671.0B parameters counted, MTP layer excluded); "
             "fp8 weights (128×128 block scales), bf16 KV cache (MLA latent), FP8 dispatch / BF16 combine, 128 sequences "
             "× 4096 tokens per GPU, prefill chunks of 4096 tokens per GPU, 8 GPUs per node over NVLink "
             "(450 GB/s per direction), InfiniBand 400 Gb/s (50 GB/s) per GPU between nodes, perfect balance. "
             "Nominal rates: H200 4.8 TB/s HBM, 1979 TFLOPS dense FP8.", "",
             "| GPUs | nodes | experts/GPU/layer | weights GiB/GPU | KV GiB/GPU | fits 90% of 141 GB | dispatch+combine "
             "KiB/token/layer | decode: comm ms | decode: experts ms | decode step bound ms | ≤ tokens/s/GPU | "
             "prefill chunk: comm ms | prefill chunk: experts ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, d, p, a = r["memory_gib"], r["decode"], r["prefill_chunk"], r["a2a_bytes_per_token_per_layer"]
        lines.append(f"| {r['hardware']['gpus']} | {r['hardware']['nodes']} | {r['experts_per_gpu']} | {m['weights']:.1f} | "
                     f"{m['kv_cache']:.1f} | {'yes' if r['fits'] else 'no'} | {(a['dispatch'] + a['combine']) / 1024:.1f} | "
                     f"{d['comm_ms']:.2f} | {d['expert_ms']:.2f} | {d['roofline_step_ms']:.2f} | "
                     f"{d['tokens_per_s_per_gpu_bound']:,.0f} | {p['comm_ms']:.1f} | {p['expert_ms']:.1f} |")
    lines += ["", f"Smallest EP degree that fits at these settings: {rows[0]['smallest_ep_that_fits']}.", ""]
    lines += comparison()
    _write(out / "plan-deepseek-v3-h200.md", "\n".join(lines))


# Published measurements (quoted with their sources; the planner's column is computed below).
DEEPEP_LL = "https://github.com/deepseek-ai/DeepEP/blob/main/docs/legacy.md"  # V1, H800 + CX7 400 Gb/s, 128 tokens
LL = {8: (77, 98, 114, 127), 16: (118, 63, 195, 74), 32: (155, 48, 273, 53), 64: (173, 43, 314, 46),
      128: (192, 39, 369, 39), 256: (194, 39, 360, 40)}  # EP: dispatch us, GB/s, combine us, GB/s
TRTLLM = "https://nvidia.github.io/TensorRT-LLM/blogs/Best_perf_practice_on_DeepSeek-R1_in_TensorRT-LLM.html"
SGLANG = "https://lmsys.org/blog/2025-05-05-large-scale-ep/"


def comparison() -> list[str]:
    H, K, T = 7168, 8, 128
    d, c = a2a_bytes_per_token(H, K, 1 + 4 / 128, 2)
    h800 = GPUS["h800"]
    out = ["## Checked against published figures", "",
           f"DeepEP V1 low-latency kernels ([{DEEPEP_LL}]({DEEPEP_LL})): H800, one CX7 400 Gb/s NIC per GPU, 128 tokens "
           "per GPU, hidden 7168, top-8, FP8 dispatch, BF16 combine, pure RDMA. *Implied bytes* = published bandwidth × "
           "latency. The planner's bytes are dsmoe's per-(token, slot) formula; its time assumes 8 GPUs per node over "
           f"NVLink ({h800.nvlink_gbps:.0f} GB/s per direction, H800) and 50 GB/s between nodes, at nominal rates.", "",
           "| EP | dispatch: published µs | implied MB | planner MB | planner µs | combine: published µs | implied MB | "
           "planner MB | planner µs |", "|---|---|---|---|---|---|---|---|---|"]
    for ep, (dt, dbw, ct, cbw) in LL.items():
        per_node = min(8, ep)
        td = a2a_seconds(T * d, ep, per_node, h800.nvlink_gbps, 50.0) * 1e6
        tc = a2a_seconds(T * c, ep, per_node, h800.nvlink_gbps, 50.0) * 1e6
        out.append(f"| {ep} | {dt} | {dbw * dt / 1e3:.2f} | {T * d / 1e6:.2f} | {td:.0f} | {ct} | {cbw * ct / 1e3:.2f} | "
                   f"{T * c / 1e6:.2f} | {tc:.0f} |")
    tr = run_plan(source=CONFIG, gpus=8, nodes=1, **{**COMMON, "context": 3072})
    out += ["", "| system | published | setting | planner |", "|---|---|---|---|",
            f"| TensorRT-LLM, DeepSeek-R1 (V3 architecture) FP8 on 8×H200, attention DP + EP8 ([{TRTLLM}]({TRTLLM})) | "
            f"1,329.7 output tokens/s/GPU | 128 sequences per GPU, ISL 1K / OSL 2K | ≤ {tr['decode']['tokens_per_s_per_gpu_bound']:,.0f} "
            f"tokens/s/GPU (roofline decode bound at 128 × 3072 context; attention compute, MTP and scheduling not modelled; "
            f"memory {tr['memory_gib']['total']:.1f} GiB/GPU) |",
            f"| SGLang, DeepSeek on 12 nodes × 8 H100, PD disaggregation + EP ([{SGLANG}]({SGLANG})) | 22.3k output "
            "tokens/s per node (2.8k per GPU), 52.3k input tokens/s per node | 2000-token inputs | not predicted: the "
            "decode batch per GPU is not in the part of the post cited here |", ""]
    return out


if __name__ == "__main__":
    main()
