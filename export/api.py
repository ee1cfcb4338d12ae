"""``export_model``: load → capture → passes → lower → write → verify, into an atomic output dir.

The output directory holds ``model.onnx`` (+ ``model.onnx.data`` past 2 GB), the model's
``config.json``, ``genai_config.json`` (ONNX Runtime GenAI runs the directory as is; targets
``ort``/``portable`` of multi-head-attention models), the checkpoint's tokenizer files when it has
them, and ``export_report.json``; target ``tensorrt`` adds the plugin library, ``plugins.json``,
``build_engine.sh`` and, with ``engine``, ``model.engine`` (:mod:`dsmoe.export.tensorrt`). It is
written through
:class:`dsmoe.outputs.OutputDir` (claimed, filled in a temporary sibling, swapped into place
atomically; an existing one is replaced only with ``force`` and only when dsmoe wrote it). With
``verify`` the check runs *before* the commit: a failed export never replaces anything — it is
kept at ``<out>.failed`` for inspection and :class:`VerificationError` (exit code 1) says so.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import onnx
import onnxruntime
import onnxscript
import torch
from dsmoe.export.files import export_digests
from dsmoe.export.genai_config import check_genai_config, genai_can_run, special_token_ids, write_genai_files
from dsmoe.export.lower import check_target, lower
from dsmoe.export.lower_quant import int4_initializers, lower_quantized
from dsmoe.export.onnx_writer import CONFIG_FILE, DATA_FILE, MODEL_FILE, OPSET, REPORT_FILE, io_names, op_histogram, to_onnx
from dsmoe.export.quant_options import quant_scheme
from dsmoe.export.quant_report import module_bytes, part_bytes, quality
from dsmoe.export.runner import OrtDecoder
from dsmoe.export.static_cache import check_kv_cache
from dsmoe.export.stream import (
    StreamedWeights,
    check_source,
    meta_model,
    must_stream,
    peak_rss_bytes,
    streamed_checks,
    swap_in_placeholders,
    template,
)
from dsmoe.export.tensorrt import (
    DEFAULT_MAX_BATCH,
    ENGINE_FILE,
    TrtDecoder,
    build_engine_from,
    check_parser_support,
    profile,
    require_tensorrt,
    write_tensorrt_files,
)
from dsmoe.export.verify_quant import check_quantized_ops, op_check_feeds, with_end_to_end
from dsmoe.passes.context import PassContext
from dsmoe.passes.expose_router import ROUTER_META
from dsmoe.passes.pipeline import VerificationError, run_pipeline
from dsmoe.plugins.aot import ARCHS
from dsmoe.plugins.trt.build import build_plugins

import dsmoe
from dsmoe.architecture import kv_cache_report
from dsmoe.dtypes import VERIFY_RTOL, parse_dtype, tag, torch_name
from dsmoe.errors import DsmoeError
from dsmoe.ir import capture, sample_inputs
from dsmoe.outputs import OutputDir
from dsmoe.outputs import check_target as check_output
from dsmoe.quantized import quantized_reference
from dsmoe.router_hooks import RouterHooks

# ONNX exports are written in fp32 or fp16 (bf16 has no ONNX Runtime CPU kernels for MoE); TensorRT takes bf16 too
EXPORT_DTYPES = {"ort": (torch.float32, torch.float16), "portable": (torch.float32, torch.float16),
                 "tensorrt": (torch.float32, torch.float16, torch.bfloat16)}

__all__ = ["REPORT_FILE", "VerificationError", "export_model", "parse_export_dtype", "verify_export"]


def parse_export_dtype(dtype: str, target: str = "ort") -> torch.dtype:
    return parse_dtype(dtype, supported=EXPORT_DTYPES[target], what=f"dtype for --target {target}")


def export_model(source: str, *, out: str, target: str = "ort", dtype: str = "fp32", verify: bool = False,
                 force: bool = False, overrides: dict | None = None, fold_shared_experts: bool = False,
                 ort_fusions: bool = True, kv_cache: str = "dynamic", router_stats: bool = False,
                 absorb_mla: bool = True, progress: Callable[[str], None] | None = None,
                 allow_nonfinite: bool = False, archs: list[str] | None = None, engine: bool = False,
                 max_batch: int | None = None, max_length: int | None = None, quant: str | None = None,
                 block_size: int | None = None, quant_scope: str | None = None, asymmetric: bool = False,
                 stream: bool | None = None, eval_text: list[str] | None = None, eval_ctx: int | None = None,
                 evaluator=None) -> dict:
    """Export ``source`` (checkpoint dir or ``preset:NAME``) to ONNX in ``out``; returns the report.

    Raises :class:`DsmoeError` for user errors (unknown target/dtype, existing ``out`` without
    ``force``, bad source) and :class:`VerificationError` (``exit_code = 1``) when ``verify``
    finds the runtime and eager apart beyond :data:`dsmoe.dtypes.VERIFY_RTOL`. ``ort_fusions`` (target ``ort``
    only) applies ONNX Runtime's contrib fusions for norms, rotary and attention. ``kv_cache``:
    ``dynamic`` (past and present sized to the filled slots) or ``static`` (one preallocated
    buffer as past and present, GenAI's ``past_present_share_buffer``; see
    :mod:`dsmoe.export.static_cache`); ``verify`` checks the mode the export was made for.
    ``router_stats`` adds the routers' choices as outputs (``router.{layer}.ids`` …, see
    :mod:`dsmoe.export.onnx_writer`; the report's ``router_outputs`` lists them); without it the
    graph is the plain decoder. ``absorb_mla`` (MLA models) exports the absorbed attention; False
    keeps the expanded form (same latent cache).

    Target ``tensorrt`` only: ``archs`` the plugin library is built for (default sm_80, sm_90),
    ``max_batch``/``max_length`` the engine's optimization profile, ``engine`` builds
    ``model.engine`` with TensorRT; ``verify`` runs that engine against eager (both need TensorRT
    and a GPU, else one line before any work).

    ``quant`` (``int8``/``int4``; with ``block_size``, ``quant_scope``, ``asymmetric``) exports
    weight-only quantized weights (:mod:`dsmoe.export.lower_quant`); the report's ``quant`` holds the
    scheme, the bytes per part and the accuracy (:mod:`dsmoe.export.quant_report`), measured on
    every quantized export; ``verify`` then fails on the first check (exactness). ``stream``
    (default: when the fp32 model would not fit in memory) exports a checkpoint one layer at a time
    (:mod:`dsmoe.export.stream`). ``eval_text`` (files; quantized, unstreamed exports of a source
    with a ``tokenizer.json``) then scores the export against the source on that text in windows of
    ``eval_ctx`` tokens with ``evaluator`` (the app's :mod:`dsmoe.app.text_quality`, i.e. ``dsmoe eval``,
    handed in so the export layer imports nothing above it): the report's ``quality``.
    """
    check_target(target)
    check_kv_cache(kv_cache)
    tdtype = parse_export_dtype(dtype, target)
    config = dsmoe.load_config(source, overrides)  # fails fast on a bad source/override
    tokens = special_token_ids(config, source)      # and on bad bos/eos/pad ids
    if not absorb_mla and not config.is_mla:
        raise DsmoeError(f"--no-absorb-mla applies to MLA models (deepseek_v2/v3) only; {source} is {config.model_type}")
    if archs is not None and not archs:
        raise DsmoeError("--arch names no GPU architecture (e.g. --arch sm_80,sm_90)")
    if router_stats and not config.moe_layers:
        raise DsmoeError(f"--router-stats: {source} has no MoE layers (nothing is routed)")
    if router_stats and kv_cache == "static":
        raise DsmoeError("--router-stats needs --kv-cache dynamic (the static mode's runner reads no extra outputs)")
    trt_only = [f for f, given in (("--arch", archs is not None), ("--engine", engine), ("--max-batch", max_batch is not None),
                                   ("--max-length", max_length is not None)) if given]
    if trt_only and target != "tensorrt":
        raise DsmoeError(f"{', '.join(trt_only)} apply to --target tensorrt only")
    not_trt = [f for f, given in (("--kv-cache static", kv_cache == "static"), ("--router-stats", router_stats)) if given]
    if not_trt and target == "tensorrt":
        raise DsmoeError(f"{', '.join(not_trt)} do(es) not apply to --target tensorrt (its engine loop runs the "
                         "dynamic cache and reads no router outputs)")
    scheme = quant_scheme(config, target=target, dtype=tdtype, quant=quant, block_size=block_size,
                          scope=quant_scope, asymmetric=asymmetric)
    if scheme is not None and kv_cache == "static":
        raise DsmoeError("--quant takes --kv-cache dynamic only (the exactness check of the quantized ops runs "
                         "the dynamic cache)")
    stream = _should_stream(source, config, scheme, stream, fold_shared_experts, router_stats)
    if stream:
        check_source(source, config, check_finite=not allow_nonfinite)  # what the loader refuses, refused here too
    if eval_text and evaluator is None:
        raise DsmoeError("--eval-text needs the evaluator (dsmoe.app.text_quality): run it through dsmoe-export")
    eval_ctx = None if evaluator is None else evaluator.check_eval_text(
        source, files=eval_text, ctx=eval_ctx, quantized=scheme is not None, stream=stream,
        max_positions=config.max_position_embeddings)
    inputs = [*([] if dsmoe.is_preset(source) else [source]), *(eval_text or [])]
    plugin_build = None
    if target == "tensorrt":
        check_output(Path(out), force=force, inputs=[Path(p) for p in inputs])  # before the plugin build
        profile(config, max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch, max_length=max_length)  # a bad profile: now
        if engine or verify:
            require_tensorrt("--engine" if engine else "--verify with --target tensorrt (it runs the engine)")
        plugin_build = build_plugins(archs or ARCHS)  # before any heavy work: no nvcc or headers is one line now
    step = _Stages(progress)
    with OutputDir(out, force=force, kind="export", inputs=inputs) as staging:
        tmp = staging.path
        model = gm = None
        if stream:
            with step("capture"):  # the whole graph on the meta device: capture, passes, lowering
                gm, pass_reports, lowered = template(config, target=target, scheme=scheme)
                fp_bytes = module_bytes(meta_model(config))
                q_bytes = part_bytes(list(gm.named_parameters()) + list(gm.named_buffers()))
                placeholders = swap_in_placeholders(gm, config)
            writer = StreamedWeights(source, config, target=target, scheme=scheme, placeholders=placeholders,
                                     check_finite=not allow_nonfinite, progress=progress)
            export_kw = dict(should_fold=lambda node: False if any(v is not None and v.name in placeholders
                                                                   for v in node.inputs) else None, save=writer)
        else:
            with step("load"):
                model = dsmoe.load(source, dtype=tdtype, overrides=overrides, allow_nonfinite=allow_nonfinite)
            with step("capture"):
                gm = capture(model)
            with step("passes"):
                gm, pass_reports = run_pipeline(gm, PassContext(fold_shared_experts=fold_shared_experts,
                                                                router_stats=router_stats, absorb_mla=absorb_mla))
            with step("lower"):
                fp_bytes = module_bytes(model) if scheme else None
                lowered = lower(gm, target=target) if scheme is None else lower_quantized(gm, target=target, scheme=scheme)
                q_bytes = part_bytes(list(gm.named_parameters()) + list(gm.named_buffers())) if scheme else None
            export_kw = {}
        router = gm.meta.get(ROUTER_META)
        with step("write"):
            proto, fusions = to_onnx(gm, tmp / MODEL_FILE, config=config, dtype=tdtype,
                                     ort_fusions=ort_fusions and target == "ort",
                                     kv_cache=kv_cache, edit=int4_initializers if scheme and target == "portable" else None,
                                     **export_kw)
            del gm
            hist = op_histogram(proto if proto is not None else _load_graph_only(tmp / MODEL_FILE))
            if target == "tensorrt":
                check_parser_support(hist, OPSET)
            cfg = config.to_dict()
            cfg["torch_dtype"] = torch_name(tdtype)
            cfg.pop("quantization_config", None)  # fp8 weights were dequantized on load
            config_text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
            (tmp / CONFIG_FILE).write_text(config_text)
            if target != "tensorrt":  # GenAI runs ONNX Runtime graphs, not plugin nodes
                write_genai_files(tmp, config=config, kv_cache=kv_cache, source=source, tokens=tokens)
        trt_info = None
        if plugin_build is not None:
            trt_info = write_tensorrt_files(tmp, config, dtype=tdtype, build=plugin_build,
                                            max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch, max_length=max_length)
            if engine or verify:
                with step("engine"):
                    trt_info["engine"] = build_engine_from(tmp, trt_info["profile"], fp32=tdtype == torch.float32).name
        verification = quant_doc = None
        if scheme is not None:  # both checks run on every quantized export
            with step("verify"):
                if stream:
                    end_to_end, accuracy = streamed_checks(source, config, scheme, tmp, progress=progress,
                                                           check_finite=not allow_nonfinite)
                else:
                    reference = quantized_reference(model, scheme)
                    end_to_end = verify_export(reference, tmp, dtype=tdtype, router_stats=router is not None)
                    accuracy = quality(model, reference, tmp)
                    del reference
                # check 1: ort's kernels quantize activations, so op by op, plus end to end within
                # E2E_RTOL (verify_quant explains why); portable: end to end at the fp32 tolerance
                verification = (with_end_to_end(check_quantized_ops(tmp, op_check_feeds(config)), end_to_end)
                                if scheme.act_quant else end_to_end)
            quant_doc = {"scheme": scheme.as_dict(), "bytes": q_bytes, "bytes_unquantized": fp_bytes,
                         "exactness": verification, "end_to_end_vs_reference": _brief(end_to_end),
                         "quality": accuracy, "streamed": stream, "peak_rss_bytes": peak_rss_bytes()}
        elif verify:
            with step("verify"):
                decoder = TrtDecoder(tmp, engine=tmp / ENGINE_FILE, validate=False) if target == "tensorrt" else None
                verification = verify_export(model, tmp, dtype=tdtype, router_stats=router is not None, decoder=decoder,
                                             check_genai=target != "tensorrt")
        del model
        report = {
            "source": str(source), "target": target, "dtype": tag(tdtype), "kv_cache": kv_cache, "opset": OPSET,
            "files": [*sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".")), REPORT_FILE],
            "model_bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.name in (MODEL_FILE, DATA_FILE)),
            "inputs": io_names(config)[0], "outputs": io_names(config, router)[1],
            "router_outputs": _router_contract(router), "kv_cache_layout": kv_cache_report(config, tdtype),
            "passes": [asdict(r) for r in pass_reports], "lowering": lowered.as_dict(), "ort_fusions": fusions, "onnx_ops": hist,
            "onnx_nodes": sum(hist.values()), "seconds": step.seconds, "versions": _versions(),
            "verification": verification, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "quant": quant_doc,
            **({"tensorrt": trt_info} if trt_info is not None else {}),
        }
        report["digests"] = export_digests(tmp, report["files"])  # checked by every reader (verify_export_files)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if verify and verification is not None and not verification["passed"]:
            state = "left as it was" if Path(out).exists() else "not written"
            try:
                kept = f"the failed export is kept in {staging.set_aside('failed')}"
            except DsmoeError as e:  # still a verification failure, and why; then why nothing was kept
                kept = str(e)
            runtime = "TensorRT" if target == "tensorrt" else "ONNX Runtime"
            what = "the quantized reference" if scheme else "eager"
            raise VerificationError(f"{runtime} differs from {what}: {verification['summary']}; {out}: {state}; {kept}")
        if eval_ctx is not None:  # the export as written and verified (its digests checked by the runner), vs the source
            with step("eval"):
                report["quality"] = evaluator.text_quality(tmp, source, files=eval_text, ctx=eval_ctx)
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")  # not among its own digests
        staging.commit()
    return report


def _brief(check: dict) -> dict:
    """The end-to-end comparison with the quantized reference, as reported beside the op-level check."""
    return {k: check[k] for k in ("rel_err", "max_abs_err", "summary") if k in check}


def _should_stream(source, config, scheme, stream: bool | None, fold_shared_experts: bool, router_stats: bool) -> bool:
    """Whether to stream (``None``: a quantized export whose fp32 model would not fit in memory);
    what cannot stream is one line. (An unquantized model too big to load is refused by the load.)"""
    if stream is None:
        stream = scheme is not None and must_stream(config)
    if not stream:
        return False
    if scheme is None:
        raise DsmoeError("--stream applies only with --quant (an unquantized export holds the whole model)")
    if fold_shared_experts:
        raise DsmoeError("--fold-shared-experts does not apply to a streamed export")
    if router_stats:
        raise DsmoeError("--router-stats does not apply to a streamed export (its parts are lowered without router outputs)")
    if config.is_mla:
        raise DsmoeError(f"{source}: streaming an MLA model (DeepSeek-V2/V3 attention) is not supported: its fp32 "
                         "model must fit in memory (--no-stream)")
    return True


@torch.no_grad()
def verify_export(model, export_dir: Path, *, dtype: torch.dtype, seed: int = 0, router_stats: bool = False,
                  decoder=None, check_genai: bool = True) -> dict:
    """Eager vs ONNX Runtime (or ``decoder``, e.g. a TensorRT engine) on the same seeded prefill (batch 2, 7 tokens) and decode (1 token
    after those 7) inputs; compares logits and the present caches (in a static-cache export, the
    filled part of its buffers), and reads ``genai_config.json`` back against the model.
    ``router_stats``: also the fraction of (token, layer) pairs whose exported expert set equals
    the eager router's (``router_agreement``; reported, not a pass/fail criterion: a near-tie may
    flip in fp16). ``decoder`` replaces the export's :class:`OrtDecoder` (a step function of the
    same signature)."""
    if router_stats:
        return _verify_with_router(model, export_dir, dtype=dtype, seed=seed, check_genai=check_genai)
    dec = decoder or OrtDecoder(export_dir)
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
    bad = [name for name, r in results.items() if not r["finite"]]
    worst = max(r["rel_err"] for r in results.values())
    max_abs = max(r["max_abs_err"] for r in results.values())
    genai = check_genai_config(export_dir) if check_genai and genai_can_run(config) else []
    passed = not bad and not genai and worst <= tol
    if bad:
        summary = f"non-finite outputs (NaN/Inf) in {', '.join(bad)}"
    else:
        summary = f"max abs error {max_abs:.3g}, relative {worst:.3g} ({'<=' if worst <= tol else '>'} {tol:g})"
    if genai:
        summary += f"; genai_config.json: {genai[0]}" + (f" (+{len(genai) - 1} more)" if len(genai) > 1 else "")
    return {"passed": passed, "tolerance": tol, "max_abs_err": max_abs, "rel_err": worst, "cases": results,
            "kv_cache": getattr(dec, "kv_cache", "dynamic"), "genai_config": genai, "summary": summary}


def _verify_with_router(model, export_dir: Path, *, dtype: torch.dtype, seed: int, check_genai: bool) -> dict:
    """:func:`verify_export` plus the router outputs against eager's routers (forward hooks)."""
    dec = OrtDecoder(export_dir, router_stats=True)
    same = total = 0

    def step(*args):  # verify_export runs eager on the same inputs just before each decoder call
        nonlocal same, total
        out, present, router = dec(*args)
        ref = hooks.pop()
        for layer, fields in ref.items():
            a = fields["ids"].sort(dim=-1).values
            b = router[layer]["ids"].sort(dim=-1).values
            same += int((a == b).all(dim=-1).sum())
            total += a.shape[0]
        return out, present

    with RouterHooks(model) as hooks:
        result = verify_export(model, export_dir, dtype=dtype, seed=seed, decoder=step, check_genai=check_genai)
    result["router_agreement"] = same / total
    result["summary"] += f"; router ids agree on {same}/{total} token-layers"
    return result


def _router_contract(router: dict[int, list[str]] | None) -> dict | None:
    """The export report's description of the router outputs (None without ``--router-stats``)."""
    if router is None:
        return None
    return {"layers": list(router), "fields": {layer: fields for layer, fields in router.items()},
            "shapes": {"ids": "[batch*sequence, K] int32", "weights": "[batch*sequence, K] float32",
                       "routed_norm": "[batch*sequence] float32", "shared_norm": "[batch*sequence] float32"},
            "rows": "token b*sequence + s of the call's input_ids"}


def _compare(ref, got, ref_past, got_past) -> dict:
    """Errors of ONNX Runtime against eager; ``finite`` is False when either side has a NaN or Inf
    (then the errors are not numbers to compare, and the check fails)."""
    pairs = [(ref.float(), got.float())] + [(a.float(), b.float()) for ra, ga in zip(ref_past, got_past)
                                            for a, b in zip(ra, ga)]
    finite = all(bool(torch.isfinite(a).all() and torch.isfinite(b).all()) for a, b in pairs)
    ref, got = pairs[0]
    abs_err = (ref - got).abs().max().item()
    rel = abs_err / max(ref.abs().max().item(), 1e-12)
    kv = max(((a - b).abs().max().item() for a, b in pairs[1:]), default=0.0)
    kv_scale = max((a.abs().max().item() for a, _ in pairs[1:]), default=1.0)
    top1 = float((ref[:, -1].argmax(-1) == got[:, -1].argmax(-1)).float().mean().item())
    return {"max_abs_err": abs_err, "rel_err": max(rel, kv / max(kv_scale, 1e-12)), "cache_max_abs_err": kv,
            "top1_agreement": top1, "finite": finite}


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
