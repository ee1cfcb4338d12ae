"""The quantized backends of the ``quant`` suite, registered into :mod:`dsmoe.bench.backends`:
``ort-int8`` / ``ort-int4`` (``dsmoe-export --quant``, run by :class:`dsmoe.export.OrtDecoder`) and
``llama.cpp-q8_0`` / ``llama.cpp-q4_0`` (a GGUF of the same seeded weights, timed by llama.cpp's
own ``llama-bench``; skipped, with the reason, where llama.cpp is not built).

A quantized backend's outputs are checked against eager with a loose bound (:data:`QUANT_RTOL`:
it catches a broken export, not quantization error, which the export measures and the notes
carry), and its floor counts its own bytes per weight. llama-bench returns no outputs: its rows
say so instead of a check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dsmoe.bench.backends import Backend, Prepared, Unsupported, _always, _scratch, export_notes, model_export, register
from dsmoe.bench.gguf_export import write_gguf
from dsmoe.bench.llama_cpp import find_llama_bench, run_llama_bench
from dsmoe.bench.suites import SEED, Workload
from dsmoe.bench.timing import Timing
from dsmoe.export import OrtDecoder

from dsmoe.quant import GGML_BLOCK, GGML_BLOCK_BYTES

# How far a quantized backend's logits may be from eager's before it is not timed (max |Δ| over
# max |logit|): a wrong export lands far outside; the accuracy itself is measured by the export
# (top-1, KL: the notes) and reported, not judged here.
QUANT_RTOL = {8: 0.1, 4: 0.5}


def _need_quant_suite(w: Workload) -> None:
    if w.suite != "quant":
        raise Unsupported("quantized backends run in the quant suite")


def _prepare_ort_quant(w: Workload, threads: int, bits: int) -> Prepared:
    _need_quant_suite(w)
    if w.device.type != "cpu":
        raise Unsupported("ONNX Runtime backends take the CPU workload")
    out = model_export(w, extra=("--quant", f"int{bits}"))
    try:
        dec = OrtDecoder(out, threads=threads)
        notes = export_notes(out)
    except BaseException:
        shutil.rmtree(out.parent, ignore_errors=True)
        raise
    notes.update(threads=threads, provider="CPUExecutionProvider")
    return Prepared(dec, notes, cleanup=lambda: shutil.rmtree(out.parent, ignore_errors=True), rtol=QUANT_RTOL[bits],
                    weight_bytes=notes.pop("linear_bytes_per_weight"))


def _llama_available() -> tuple[bool, str]:
    exe, why = find_llama_bench()
    if exe is None:
        return False, why
    try:
        _gguf_module()
    except ImportError:
        return False, "the gguf package is not installed (pip install gguf): no GGUF can be written"
    return True, ""


def _gguf_module():
    import gguf  # lazy: optional dependency (the llama.cpp baseline only)

    return gguf


class LlamaBench:
    """llama-bench on a GGUF: a case's latency as llama.cpp measures it (prefill: ``-p S``;
    decode: ``-n N -d P``, per token), on the workload's thread count."""

    def __init__(self, path: Path, threads: int, reps: int):
        self.path, self.threads, self.reps = path, threads, reps

    def time(self, case) -> Timing:
        if case.per > 1:
            run = run_llama_bench(self.path, threads=self.threads, gen=case.info["steps"], depth=case.info["past_start"],
                                  reps=self.reps)
        else:
            run = run_llama_bench(self.path, threads=self.threads, prompt=case.tokens, reps=self.reps)
        return Timing(median_s=run.mean_s, min_s=run.mean_s - run.stddev_s, max_s=run.mean_s + run.stddev_s,
                      iqr_s=2 * run.stddev_s, iters=run.reps, warmup=1)


def _prepare_llama(w: Workload, threads: int, qtype: str) -> Prepared:
    _need_quant_suite(w)
    tmp = _scratch()
    try:
        info = write_gguf(w.source, tmp / f"model-{qtype}.gguf", qtype=qtype, overrides=w.overrides, seed=SEED)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = {"gguf": {k: v for k, v in info.items() if k != "path"}, "threads": threads,
             "timing": "llama-bench's own: mean ± stddev of its repetitions (shown as spread)"}
    return Prepared(LlamaBench(Path(info["path"]), threads, reps=3), notes,
                    cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True), external=True,
                    weight_bytes=GGML_BLOCK_BYTES[qtype] / GGML_BLOCK)


register(Backend("ort-int8", "ONNX Runtime CPU EP, dsmoe-export --quant int8 (QMoE + MatMulNBits)", _always,
                 lambda w, t: _prepare_ort_quant(w, t, 8)))
register(Backend("ort-int4", "ONNX Runtime CPU EP, dsmoe-export --quant int4 (QMoE + MatMulNBits)", _always,
                 lambda w, t: _prepare_ort_quant(w, t, 4)))
register(Backend("llama.cpp-q8_0", "llama.cpp llama-bench, GGUF Q8_0 of the same weights", _llama_available,
                 lambda w, t: _prepare_llama(w, t, "Q8_0")))
register(Backend("llama.cpp-q4_0", "llama.cpp llama-bench, GGUF Q4_0 of the same weights", _llama_available,
                 lambda w, t: _prepare_llama(w, t, "Q4_0")))
