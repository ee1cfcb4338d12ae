"""``export_model``: load → capture → passes → lower → write → verify, into an atomic output dir.

The output directory holds ``model.onnx`` (+ ``model.onnx.data`` past 2 GB), the model's
``config.json`` and ``export_report.json``. It is filled in a temporary sibling and renamed; an
existing one is refused unless ``force``. With ``verify`` the artifact is committed *and then*
a failed check raises :class:`VerificationError` (exit code 1), so the failing model and its
report stay available for inspection.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import onnx
import onnxruntime
import onnxscript
import torch

import dsmoe
from dsmoe.architecture import kv_cache_report
from dsmoe.checkpoint import commit_output_dir, prepare_output_dir
from dsmoe.dtypes import VERIFY_RTOL, parse_dtype, tag, torch_name
from dsmoe.export.lower import check_target, lower
from dsmoe.export.onnx_writer import DATA_FILE, MODEL_FILE, OPSET, io_names, op_histogram, to_onnx
from dsmoe.export.runner import OrtDecoder
from dsmoe.ir import capture, sample_inputs
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import VerificationError, run_pipeline

# ONNX exports are written in fp32 or fp16 (bf16 has no ONNX Runtime CPU kernels for MoE)
EXPORT_DTYPES = (torch.float32, torch.float16)
REPORT_FILE = "export_report.json"

__all__ = ["REPORT_FILE", "VerificationError", "export_model", "parse_export_dtype", "verify_export"]


def parse_export_dtype(dtype: str) -> torch.dtype:
    return parse_dtype(dtype, supported=EXPORT_DTYPES, what="dtype for export")


def export_model(source: str, *, out: str, target: str = "ort", dtype: str = "fp32", verify: bool = False,
                 force: bool = False, overrides: dict | None = None, fold_shared_experts: bool = False,
                 ort_fusions: bool = True, absorb_mla: bool = True,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Export ``source`` (checkpoint dir or ``preset:NAME``) to ONNX in ``out``; returns the report.

    Raises :class:`DsmoeError` for user errors (unknown target/dtype, existing ``out`` without
    ``force``, bad source) and :class:`VerificationError` (``exit_code = 1``) when ``verify``
    finds ONNX Runtime and eager apart beyond :data:`dsmoe.dtypes.VERIFY_RTOL`. ``ort_fusions`` (target ``ort``
    only) applies ONNX Runtime's contrib fusions for norms, rotary and attention. ``absorb_mla``
    (MLA models) exports the absorbed attention; False keeps the expanded form (same latent cache).
    """
    check_target(target)
    tdtype = parse_export_dtype(dtype)
    config = dsmoe.load_config(source, overrides)  # fails fast on a bad source/override
    out_dir = Path(out)
    tmp = prepare_output_dir(out_dir, force=force)
    step = _Stages(progress)
    try:
        with step("load"):
            model = dsmoe.load(source, dtype=tdtype, overrides=overrides)
        with step("capture"):
            gm = capture(model)
        with step("passes"):
            gm, pass_reports = run_pipeline(gm, PassContext(fold_shared_experts=fold_shared_experts, absorb_mla=absorb_mla))
        with step("lower"):
            lowered = lower(gm, target=target)
        with step("write"):
            proto, fusions = to_onnx(gm, tmp / MODEL_FILE, config=config, dtype=tdtype,
                                     ort_fusions=ort_fusions and target == "ort")
            del gm
            hist = op_histogram(proto if proto is not None else _load_graph_only(tmp / MODEL_FILE))
            cfg = config.to_dict()
            cfg["torch_dtype"] = torch_name(tdtype)
            cfg.pop("quantization_config", None)  # fp8 weights were dequantized on load
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        verification = None
        if verify:
            with step("verify"):
                verification = verify_export(model, tmp, dtype=tdtype)
        report = {
            "source": str(source), "target": target, "dtype": tag(tdtype), "opset": OPSET,
            "files": [*sorted(p.name for p in tmp.iterdir()), REPORT_FILE],
            "model_bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.name in (MODEL_FILE, DATA_FILE)),
            "inputs": io_names(config)[0], "outputs": io_names(config)[1], "kv_cache": kv_cache_report(config, tdtype),
            "passes": [asdict(r) for r in pass_reports], "lowering": lowered.as_dict(), "ort_fusions": fusions, "onnx_ops": hist,
            "onnx_nodes": sum(hist.values()), "seconds": step.seconds, "versions": _versions(),
            "verification": verification,
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        commit_output_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verification is not None and not verification["passed"]:
        raise VerificationError(f"ONNX Runtime differs from eager: {verification['summary']} (report: {out_dir / REPORT_FILE})")
    return report


@torch.no_grad()
def verify_export(model, export_dir: Path, *, dtype: torch.dtype, seed: int = 0) -> dict:
    """Eager vs ONNX Runtime on the same seeded prefill (batch 2, 7 tokens) and decode (1 token
    after those 7) inputs; compares logits and the present caches."""
    dec = OrtDecoder(export_dir)
    config = model.config
    ids, mask, pos, past = sample_inputs(config, batch=2, seq=7, past=0, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    nxt = torch.randint(0, config.vocab_size, (2, 1), generator=g)
    results, tol = {}, VERIFY_RTOL[dtype]
    ref, ref_past = model(ids, mask, pos, past, use_cache=True)
    got, got_past = dec(ids, mask, pos, past)
    results["prefill"] = _compare(ref, got, ref_past, got_past)
    mask2 = torch.ones(2, 8, dtype=torch.int64)
    pos2 = torch.full((2, 1), 7, dtype=torch.int64)
    ref2, ref_past2 = model(nxt, mask2, pos2, ref_past, use_cache=True)
    got2, got_past2 = dec(nxt, mask2, pos2, ref_past)
    results["decode"] = _compare(ref2, got2, ref_past2, got_past2)
    worst = max(r["rel_err"] for r in results.values())
    max_abs = max(r["max_abs_err"] for r in results.values())
    passed = bool(worst <= tol)  # NaN fails
    return {"passed": passed, "tolerance": tol, "max_abs_err": max_abs, "rel_err": worst, "cases": results,
            "summary": f"max abs error {max_abs:.3g}, relative {worst:.3g} ({'<=' if passed else '>'} {tol:g})"}


def _compare(ref, got, ref_past, got_past) -> dict:
    ref, got = ref.float(), got.float()
    abs_err = (ref - got).abs().max().item()
    rel = abs_err / max(ref.abs().max().item(), 1e-12)
    kv = max(((a.float() - b.float()).abs().max().item() for ra, ga in zip(ref_past, got_past) for a, b in zip(ra, ga)),
             default=0.0)
    top1 = float((ref[:, -1].argmax(-1) == got[:, -1].argmax(-1)).float().mean().item())
    kv_scale = max(t.float().abs().max().item() for kvp in ref_past for t in kvp)
    return {"max_abs_err": abs_err, "rel_err": max(rel, kv / max(kv_scale, 1e-12)),
            "cache_max_abs_err": kv, "top1_agreement": top1}


def _load_graph_only(path: Path):
    return onnx.load(str(path), load_external_data=False)


def _versions() -> dict:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "python": platform.python_version()}


class _Stages:
    """``with step("name"):`` — reports the stage to ``progress`` and times it."""

    def __init__(self, progress):
        self.progress, self.seconds, self._name = progress, {}, None

    def __call__(self, name: str):
        self._name = name
        return self

    def __enter__(self):
        if self.progress:
            self.progress(self._name)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds[self._name] = round(time.perf_counter() - self._t, 3)
        return False
