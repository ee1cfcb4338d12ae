"""The ``quality`` table: what quantization costs on a trained model, dsmoe beside llama.cpp.

On held-out text, both stacks score the same weights with the same token ids and the same windows
(llama-perplexity's convention, which ``dsmoe eval`` follows; the GGUF carries the checkpoint's
byte-level BPE, so llama.cpp tokenizes the text to the same ids):

* dsmoe: the eager fp32 model is the baseline (its log-probabilities saved once); the fp32 ONNX
  export and the ``--quant int8`` / ``int4`` exports (ONNX Runtime, MatMulNBits + QMoE, int8
  activations) are scored against it.
* llama.cpp: ``llama-perplexity`` on the F32 GGUF writes its baseline (``--kl-divergence-base``),
  then Q8_0 and Q4_0 GGUFs (ggml's reference quantizers, byte for byte) are scored against it
  (``--kl-divergence``).

Each row: bits per weight of the quantized linears (weights + block scales; embeddings, router
and norms stay fp32 in both), PPL, PPL ratio to its own fp32 baseline, mean KLD (± standard
error), 99th-percentile KLD, same top-1 %, RMS Δp. The two fp32 baselines must agree (the
external check of the model and of the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

from dsmoe.bench.gguf_export import write_gguf
from dsmoe.export import export_model

import dsmoe
from dsmoe.app.evaluate.run import run_eval
from dsmoe.errors import DsmoeError
from dsmoe.quant import parse_scheme
from dsmoe.quantized import quantized_dims

# (row name, dsmoe-export --quant, --block-size): int4 with 64-wide blocks where they fit is near Q4_0's 4.5 bits
DSMOE_ROWS = (("dsmoe fp32 (ORT)", None, None), ("dsmoe int8", "int8", None), ("dsmoe int4", "int4", None),
              ("dsmoe int4 b32", "int4", 32))
LLAMA_ROWS = (("llama.cpp Q8_0", "Q8_0", 8.5), ("llama.cpp Q4_0", "Q4_0", 4.5))


def dsmoe_bits_per_weight(config, bits: int, block_size: int | None) -> float:
    """Bits per quantized weight: ``bits`` plus one fp32 scale per block, over the linears ``--quant`` takes."""

    scheme = parse_scheme(f"int{bits}", block_size=block_size, dims=quantized_dims(config, "all"))
    H, I, Im, V = config.hidden_size, config.intermediate_size, config.moe_intermediate_size, config.vocab_size
    attn = [(H, 4 * H * H)]
    mats = []
    for i in range(config.num_hidden_layers):
        mats += attn
        if config.is_moe_layer(i):
            E, S = config.n_routed_experts, config.shared_intermediate_size
            mats += [(H, 2 * H * Im * E), (Im, Im * H * E)] + ([(H, 2 * H * S), (S, S * H)] if S else [])
        else:
            mats += [(H, 2 * H * I), (I, I * H)]
    mats.append((H, H * V))  # lm_head
    total = sum(n for _, n in mats)
    return sum(n * (bits + 32 / scheme.block_for(K)) for K, n in mats) / total


def llama_perplexity(binary: str, gguf: Path, text: Path, ctx: int, kld_base: Path, *, write_base: bool,
                     threads: int = 1) -> dict:
    args = [binary, "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "-t", str(threads),
            "--kl-divergence-base", str(kld_base)]
    if not write_base:
        args.append("--kl-divergence")
    run = subprocess.run(args, capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode:
        raise DsmoeError(f"llama-perplexity failed on {gguf.name}: {log.strip().splitlines()[-1][:200]}")
    got = parse_llama(log, base=write_base)
    if got["ppl"] is None:
        (gguf.parent / f"{gguf.stem}.llama.log").write_text(log)
        raise DsmoeError(f"llama-perplexity on {gguf.name} printed no statistics (its log: {gguf.stem}.llama.log)")
    return got


def _num(pattern: str, log: str) -> float | None:
    m = re.search(pattern, log)
    return float(m.group(1)) if m else None


def parse_llama(log: str, *, base: bool) -> dict:
    if base:
        return {"ppl": _num(r"Final estimate: PPL = ([0-9.]+)", log),
                "ppl_stderr": _num(r"Final estimate: PPL = [0-9.]+ \+/- ([0-9.]+)", log)}
    return {"ppl": _num(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", log),
            "ppl_ratio": _num(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([0-9.]+)", log),
            "kld_mean": _num(r"Mean\s+KLD:\s*([0-9.eE+-]+)", log),
            "kld_stderr": _num(r"Mean\s+KLD:\s*[0-9.eE+-]+\s*±\s*([0-9.eE+-]+)", log),
            "kld_99": _num(r"99\.0%\s+KLD:\s*([0-9.eE+-]+)", log),
            "same_top1": _num(r"Same top p:\s*([0-9.]+)", log) / 100 if _num(r"Same top p:\s*([0-9.]+)", log) else None,
            "dp_rms": _num(r"RMS Δp\s*:\s*([0-9.]+)", log) / 100 if _num(r"RMS Δp\s*:\s*([0-9.]+)", log) else None}


def run_quality(*, source: str, text: Path, ctx: int, work: Path, llama_bin: Path | None, threads: int = 1,
                log=print) -> dict:
    """Every row of the table; ``work`` holds the exports, GGUFs and logits (re-made each run)."""

    config = dsmoe.load_config(source)
    work.mkdir(parents=True, exist_ok=True)
    base_logits = work / "dsmoe-fp32.logits.safetensors"
    base = run_eval(source=source, text=[str(text)], ctx=ctx, save_logits=str(base_logits), force=True, threads=threads,
                    progress=False)
    log(f"dsmoe eager fp32: PPL {base['ppl']:.4f}")
    rows = [{"name": "dsmoe fp32 (eager, baseline)", "bpw": 32.0, "ppl": base["ppl"], "ppl_stderr": base["ppl_stderr"],
             "bits_per_byte": base["bits_per_byte"], "tokens": base["tokens"]}]
    for name, quant, block in DSMOE_ROWS:
        out = work / ("dsmoe-" + (quant or "fp32") + (f"-b{block}" if block else ""))
        export_model(source, out=str(out), quant=quant, block_size=block, force=True)
        r = run_eval(source=str(out), text=[str(text)], ctx=ctx, baseline_logits=str(base_logits), threads=threads,
                     progress=False)
        b = r["baseline"]
        rows.append({"name": name, "bpw": dsmoe_bits_per_weight(config, int(quant[3:]), block) if quant else 32.0,
                     "ppl": r["ppl"], "ppl_ratio": b["ppl_ratio"], "kld_mean": b["kld_mean"], "kld_stderr": b["kld_stderr"],
                     "kld_99": b["kld_percentiles"]["99"], "same_top1": b["same_top1"], "dp_rms": b["dp_rms"]})
        log(f"{name}: PPL {r['ppl']:.4f}, ratio {b['ppl_ratio']:.5f}, KLD {b['kld_mean']:.6f}")
    if llama_bin is not None:
        binary = str(llama_bin / "llama-perplexity")
        kld_base = work / "llama-f32.kld"
        f32 = work / "minimoe-F32.gguf"
        write_gguf(source, f32, qtype="F32")
        lf = llama_perplexity(binary, f32, text, ctx, kld_base, write_base=True, threads=threads)
        rows.append({"name": "llama.cpp F32 (baseline)", "bpw": 32.0, **lf})
        log(f"llama.cpp F32: PPL {lf['ppl']}")
        for name, qtype, bpw in LLAMA_ROWS:
            g = work / f"minimoe-{qtype}.gguf"
            write_gguf(source, g, qtype=qtype)
            r = llama_perplexity(binary, g, text, ctx, kld_base, write_base=False, threads=threads)
            rows.append({"name": name, "bpw": bpw, **r})
            log(f"{name}: {r}")
    return {"source": source, "text": str(text), "ctx": ctx, "rows": rows}


def markdown(result: dict, machine: str) -> str:
    lines = [f"# quality: what quantization costs (minimoe, held-out text) — {machine}", "",
             f"Model `{result['source']}`, text `{result['text']}`, windows of {result['ctx']} tokens scoring their "
             "second half (llama-perplexity's convention), the same token ids in both stacks.", "",
             "| row | bits/weight | PPL | PPL ratio | mean KLD | KLD p99 | same top-1 | RMS Δp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        def f(k, fmt, r=r):
            v = r.get(k)
            return "—" if v is None else format(v, fmt)
        lines.append(f"| {r['name']} | {r['bpw']:.2f} | {f('ppl', '.4f')} | {f('ppl_ratio', '.5f')} | {f('kld_mean', '.6f')} | "
                     f"{f('kld_99', '.5f')} | {'—' if r.get('same_top1') is None else format(100 * r['same_top1'], '.2f') + ' %'} | "
                     f"{'—' if r.get('dp_rms') is None else format(100 * r['dp_rms'], '.3f') + ' %'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:

    p = argparse.ArgumentParser(prog="python -m dsmoe.bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("source")
    p.add_argument("--text", required=True)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--work", default="out/quality")
    p.add_argument("--llama-bin", default=None, help="directory of llama.cpp's binaries (llama-perplexity)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default="AMD EPYC (Zen 4) 2-core VM, AVX-512/VNNI")
    p.add_argument("--out", default=None, help="write the markdown table (and .json beside it) here")
    a = p.parse_args(argv)
    res = run_quality(source=a.source, text=Path(a.text), ctx=a.ctx, work=Path(a.work),
                      llama_bin=Path(a.llama_bin) if a.llama_bin else None, threads=a.threads)
    res["machine"] = a.machine
    md = markdown(res, a.machine)
    print(md)
    if a.out:
        Path(a.out).write_text(md)
        Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
