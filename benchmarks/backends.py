"""The backend registry: a backend is a name, ``available() -> (ok, reason)`` and
``prepare(workload) -> callable``.

The callable has the suite's signature (``moe-layer``: ``x [T,H] → y``; ``model``: the decoder
step of :func:`dsmoe.ir.capture`). ``prepare`` raises :class:`Unsupported` for a suite it cannot
take (the harness lists the backend as skipped with the reason). Later backends (CUDA ops,
``grouped_mm``, TensorRT) call :func:`register` from their own module; an unavailable one is
reported as skipped, never silently left out.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from dsmoe.bench.suites import Workload
from dsmoe.export import MODEL_FILE, REPORT_FILE, OrtDecoder, export_layer, lower, session
from dsmoe.export import op_histogram as onnx_op_histogram
from dsmoe.export.genai_runner import GenaiModel, GenaiStep, require_genai
from dsmoe.export.quant_report import linear_bytes_per_weight
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline
from dsmoe.plugins import grouped_mm_available, grouped_mm_moe
from torch.export import Dim

from dsmoe.app.cuda_graphs import CudaGraphed, StaticDecoder, static_length
from dsmoe.app.device import require_cuda_kernels
from dsmoe.children import run_child
from dsmoe.contract import STACKED_W2, STACKED_W13, experts_path
from dsmoe.errors import DsmoeError
from dsmoe.ir import capture, op_histogram, unlift
from dsmoe.ops import MOE, ROUTE, moe_reference, route_reference


class Unsupported(Exception):
    """This backend cannot run this workload (the message says why)."""


@dataclass
class Prepared:
    fn: Callable
    notes: dict = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None
    # a quantized backend: its outputs are held to ``rtol`` against eager (not the dtype's), and its
    # floor counts its linears' weights at ``weight_bytes`` per element
    rtol: float | None = None
    weight_bytes: float | None = None
    # an external program that times itself (llama.cpp): ``fn.time(case) -> Timing``, no outputs to check
    external: bool = False


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    available: Callable[[], tuple[bool, str]]
    prepare: Callable[[Workload, int], Prepared]   # (workload, threads)


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


def _always() -> tuple[bool, str]:
    return True, ""


# ---- eager ----------------------------------------------------------------------------------

def _prepare_eager(w: Workload, threads: int) -> Prepared:
    return Prepared(w.eager, {"what": "reference model (per-expert gather / run / index_add)"})


# ---- fused: captured IR + pass pipeline, dsmoe CPU ops ---------------------------------------

def fused_graph(w: Workload) -> tuple[torch.fx.GraphModule, dict]:
    """Capture the workload's subject and run the pass pipeline; returns the graph and the
    per-pass rewrite counts (regions a pass skipped are listed with the reason)."""
    with torch.no_grad():
        if w.suite == "moe-layer":
            # the export is cached on the workload; each backend unlifts its own graph from it
            if "exported" not in w.cache:
                x = torch.randn(3, w.config.hidden_size, device=w.device, dtype=w.dtype)
                w.cache["exported"] = torch.export.export(w.eager, (x,), dynamic_shapes=({0: Dim("T", min=1, max=1 << 16)},),
                                                          strict=False)
            gm = unlift(w.cache["exported"])
            gm.meta["dsmoe_config"] = w.config
            gm.meta["dsmoe_dtype"] = w.dtype
        else:
            gm = capture(w.eager.lm)
    passes = _run_passes(gm)
    skipped = [s for p in passes.values() for s in p["skipped"]]
    if skipped:
        raise Unsupported(f"pass pipeline left regions unfused: {'; '.join(skipped)}")
    if w.suite == "model":
        share_expert_weights(w.eager.lm, gm)
    return gm, {"passes": passes, "ops": op_histogram(gm)}


def share_expert_weights(model: torch.nn.Module, gm: torch.fx.GraphModule) -> None:
    """Point the eager model's expert weights at views of the fused graph's stacked ``w13``/``w2``
    (same values), so the two backends hold one copy: the 16B model is 33 GB in bf16, two copies
    do not fit an 80 GB GPU."""
    root = gm.lm if hasattr(gm, "lm") else gm
    for i, layer in enumerate(model.model.layers):
        try:
            experts = root.get_submodule(experts_path(i))
        except AttributeError:
            continue
        w13, w2 = getattr(experts, STACKED_W13, None), getattr(experts, STACKED_W2, None)
        if w13 is None or w2 is None:
            continue
        I = w2.shape[2]
        for e, mlp in enumerate(layer.mlp.experts):
            mlp.gate_proj.weight = torch.nn.Parameter(w13[e, :I], requires_grad=False)
            mlp.up_proj.weight = torch.nn.Parameter(w13[e, I:], requires_grad=False)
            mlp.down_proj.weight = torch.nn.Parameter(w2[e], requires_grad=False)


def _run_passes(gm) -> dict:
    _, reports = run_pipeline(gm, PassContext())
    return {r.name: {"rewrites": r.rewrites, "skipped": list(r.skipped)} for r in reports}


def cached_fused_graph(w: Workload) -> tuple[torch.fx.GraphModule, dict]:
    """The workload's fused graph, built once (capture + pipeline cost tens of seconds at 16B)."""
    if "fused" not in w.cache:
        w.cache["fused"] = fused_graph(w)
    return w.cache["fused"]


def _prepare_fused(w: Workload, threads: int) -> Prepared:
    """The fused graph with the ops' default (torch) implementations, on the workload's device."""
    gm, notes = cached_fused_graph(w)
    if w.device.type == "cpu":
        return Prepared(gm, dict(notes))
    # on a GPU the ops would dispatch to the registered CUDA kernels (backend `cuda`)
    return Prepared(graph_with(gm, {ROUTE: route_reference, MOE: moe_reference}),
                    {**notes, "what": "fused graph, dsmoe ops' torch implementations (one host sync per MoE)"})


def graph_with(gm: torch.fx.GraphModule, targets: dict) -> torch.fx.GraphModule:
    """A GraphModule sharing ``gm``'s parameters whose call targets are replaced per ``targets``."""
    with warnings.catch_warnings():  # deepcopy of a graph warns about pytree internals
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    for n in graph.nodes:
        if n.op == "call_function" and n.target in targets:
            n.target = targets[n.target]
    return torch.fx.GraphModule(gm, graph)


# ---- grouped_mm: the fused graph with dsmoe::moe on torch._grouped_mm ---------------------

def _grouped_mm_available() -> tuple[bool, str]:
    ok = grouped_mm_available()
    return ok, "" if ok else f"torch {torch.__version__} has no torch._grouped_mm"


def _grouped_moe(x, weights, ids, w13, w2, activation):
    if activation != "silu":
        raise Unsupported(f"grouped_mm baseline supports silu only, got {activation!r}")
    return grouped_mm_moe(x, weights, ids, w13, w2)


def _prepare_grouped_mm(w: Workload, threads: int) -> Prepared:
    """The fused graph (shared parameters, its own graph copy) with every ``dsmoe::moe`` node
    calling PyTorch's grouped GEMM instead: the path transformers takes, as a baseline. The router
    is the torch implementation, so this backend uses none of dsmoe's kernels."""
    gm, _ = cached_fused_graph(w)
    return Prepared(graph_with(gm, {MOE: _grouped_moe, ROUTE: route_reference}),
                    {"what": "fused graph, dsmoe::moe → torch._grouped_mm, router in torch ops"})


# ---- cuda: the fused graph with dsmoe's Triton kernels (plugins/) ------------------------------

def _cuda_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, f"no CUDA device (torch {torch.__version__})"
    try:
        require_cuda_kernels()
    except DsmoeError as e:
        return False, str(e)
    return True, ""


def _need_cuda_workload(w: Workload) -> None:
    if w.device.type != "cuda":
        raise Unsupported("the workload is on the CPU: run with --device cuda")


def _prepare_cuda(w: Workload, threads: int) -> Prepared:
    _need_cuda_workload(w)
    gm, notes = cached_fused_graph(w)
    return Prepared(gm, {**notes, "what": "fused graph, dsmoe::route / dsmoe::moe on the Triton kernels (plugins/)"})


def _prepare_cuda_graph(w: Workload, threads: int) -> Prepared:
    """The ``cuda`` backend's graph replayed from CUDA graphs: the layer, one graph per T
    (:class:`dsmoe.app.cuda_graphs.CudaGraphed`); the model, behind
    :class:`dsmoe.app.cuda_graphs.StaticDecoder` (decode steps replay one graph over a static KV
    cache sized to the case; prefill runs as is)."""
    _need_cuda_workload(w)
    gm, notes = cached_fused_graph(w)
    if w.suite == "moe-layer":
        return Prepared(CudaGraphed(gm), {**notes, "what": "cuda backend, each T replayed from its CUDA graph"})
    length = static_length(w.shapes["prefill"] + w.shapes["decode_steps"])
    dec = StaticDecoder(gm, w.config, max_len=length, dtype=w.dtype, device=w.device, cuda_graph=True)
    return Prepared(dec, {**notes, "static_cache_len": length,
                          "what": "cuda backend, decode replayed from one CUDA graph (static KV cache)"})


# ---- ONNX Runtime ---------------------------------------------------------------------------

def _ort_cuda_available() -> tuple[bool, str]:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime has no CUDAExecutionProvider here"
    return True, ""


def layer_onnx(w: Workload, path: Path) -> dict:
    """The single-layer ONNX model, made the way ``dsmoe-export`` makes a model: fused IR →
    :func:`dsmoe.export.lower` (target ``ort``) → :func:`dsmoe.export.export_layer` (the same
    opset, exporter options, ORT fusions and checks), with a dynamic token axis."""
    fused, notes = cached_fused_graph(w)
    with warnings.catch_warnings():  # deepcopy of a GraphModule warns about pytree internals
        warnings.simplefilter("ignore", FutureWarning)
        gm, notes = copy.deepcopy(fused), dict(notes)  # lowering rewrites in place; keep the fused graph
    report = lower(gm, target="ort")
    notes["lowered"] = {op: dict(v) for op, v in report.lowered.items()}
    x = torch.randn(3, w.config.hidden_size)
    export_layer(gm, x, path, ort_fusions=True)
    del gm
    return notes


def _scratch() -> Path:
    """Artifacts go to RAM-backed /dev/shm when present (GBs of external data; the disk is slow)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="dsmoe-bench-", dir=base))


def _prepare_ort(w: Workload, threads: int, provider: str = "CPUExecutionProvider", kv_cache: str = "dynamic") -> Prepared:
    if w.device.type != "cpu":
        raise Unsupported(f"ONNX Runtime backends take the CPU workload (this one is on {w.device})")
    whole = w.suite in ("model", "quant")  # a whole decoder (dsmoe-export), not one layer
    if whole and provider != "CPUExecutionProvider":
        raise Unsupported(f"the model suite runs ORT through dsmoe.export.OrtDecoder (CPU); {provider} not wired")
    if kv_cache != "dynamic" and not whole:
        raise Unsupported("a KV-cache mode is a property of a whole-decoder export (the model suite)")
    if whole:
        out = model_export(w, kv_cache)
        dec = OrtDecoder(out, threads=threads)
        notes = {**export_notes(out), "kv_cache": dec.kv_cache, "threads": threads,
                 "provider": provider, "what": "dsmoe's loop: dsmoe.export.OrtDecoder on the dsmoe-export directory"}
        return Prepared(dec, notes, cleanup=lambda: shutil.rmtree(out.parent, ignore_errors=True))
    tmp = _scratch()
    try:
        notes = layer_onnx(w, tmp / "layer.onnx")
        sess = session(tmp / "layer.onnx", threads=threads, providers=[provider])
        notes["onnx_ops"] = _onnx_ops(tmp / "layer.onnx")
        fn = lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])  # noqa: E731
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes.update(threads=threads, provider=provider)
    return Prepared(fn, notes, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))


def _onnx_ops(path: Path) -> dict[str, int]:
    return onnx_op_histogram(onnx.load(str(path), load_external_data=False))


class ExportFailed(RuntimeError):
    """``dsmoe-export`` of the workload failed: the backend is reported as failed, with its message."""


def model_export(w: Workload, kv_cache: str = "dynamic", extra: tuple[str, ...] = ()) -> Path:
    """The whole model through ``dsmoe-export`` — the product's own command, in a child process so
    that its peak memory is returned before timing — once per cache mode and options (``extra``:
    e.g. ``--quant int4``); the ``ort`` and ``genai`` backends of a mode run the same directory."""
    key = " ".join((f"export-{kv_cache}", *extra))
    if key not in w.cache:
        # on disk, not /dev/shm: two sessions (ort, genai) already hold the weights in RAM, and a
        # third, pinned copy of the files got the 16B 2-layer run OOM-killed on a 23 GB machine
        out = Path(tempfile.mkdtemp(prefix="dsmoe-bench-")) / "model-ort"
        argv = [w.source, "--out", str(out), "--target", "ort", "--dtype", "fp32", "--kv-cache", kv_cache, *extra]
        for k, v in (w.overrides or {}).items():
            argv += ["--set", f"{k}={json.dumps(v)}"]
        proc = run_child([sys.executable, "-c", "from dsmoe.app.cli import export_main; export_main()", *argv],
                              capture_output=True, text=True)
        if proc.returncode:
            shutil.rmtree(out.parent, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise ExportFailed(f"dsmoe-export exited {proc.returncode}: {tail[0]}")
        w.cache[key] = out
    return w.cache[key]


def export_notes(out: Path) -> dict:
    """What a backend's notes say of a ``dsmoe-export`` directory: its ONNX ops and, for a
    quantized export, the scheme, bytes, exactness and accuracy from its report."""
    notes = {"onnx_ops": _onnx_ops(out / MODEL_FILE)}
    report = json.loads((out / REPORT_FILE).read_text())
    if report.get("quant"):
        q = report["quant"]
        notes.update(quant=q["scheme"], weight_bytes=q["bytes"], exactness=q["exactness"]["summary"],
                     linear_bytes_per_weight=linear_bytes_per_weight(q),
                     quality={k: q["quality"][k] for k in ("top1_agreement", "mean_kl", "max_abs_logit_err",
                                                           "routing_drift_mean")},
                     export_seconds=report["seconds"], model_bytes=report["model_bytes"])
    return notes


# ---- genai: the same export in ONNX Runtime GenAI (the real client) ------------------------

def _genai_available() -> tuple[bool, str]:
    try:
        require_genai()
    except DsmoeError as e:
        return False, str(e)
    return True, ""


def _prepare_genai(w: Workload, threads: int, kv_cache: str = "dynamic") -> Prepared:
    """:class:`dsmoe.export.genai_runner.GenaiStep` on the ``ort`` backend's export, loaded from its
    own ``genai_config.json`` (intra-op threads overlaid to ``threads``, as every backend gets).
    GenAI keeps its own cache, so the decode case continues from the prompt it was primed with."""
    if w.suite != "model":
        raise Unsupported("GenAI runs whole decoders (the model suite)")
    if w.device.type != "cpu":
        raise Unsupported(f"the GenAI backend takes the CPU workload (this one is on {w.device})")
    out = model_export(w, kv_cache)
    model = GenaiModel(out, threads=threads)
    step = GenaiStep(model, max_length=w.shapes["prefill"] + w.shapes["decode_steps"])
    step.prime(w.prompt_ids)
    notes = {"kv_cache": kv_cache, "past_present_share_buffer": model.share_buffer, "threads": threads,
             "what": "onnxruntime-genai (its own loop and KV cache) on the dsmoe-export directory, as written"}
    return Prepared(step, notes, cleanup=lambda: shutil.rmtree(out.parent, ignore_errors=True))


# ---- the registry ---------------------------------------------------------------------------

register(Backend("eager", "reference PyTorch model", _always, _prepare_eager))
register(Backend("fused", "captured IR after the pass pipeline, dsmoe CPU ops", _always, _prepare_fused))
register(Backend("grouped_mm", "fused graph with MoE on torch._grouped_mm (transformers' grouped path)",
                 _grouped_mm_available, _prepare_grouped_mm))
register(Backend("cuda", "fused graph, dsmoe::route / dsmoe::moe on the Triton kernels (plugins/)", _cuda_available,
                 _prepare_cuda))
register(Backend("cuda-graph", "cuda backend, decode step replayed from a CUDA graph", _cuda_available,
                 _prepare_cuda_graph))
register(Backend("ort", "ONNX Runtime CPU EP (com.microsoft.MoE), threads = cores; model: dsmoe's own loop",
                 _always, _prepare_ort))
register(Backend("genai", "onnxruntime-genai on the ort backend's export (model suite)", _genai_available,
                 _prepare_genai))
register(Backend("ort-static", "ort backend on a --kv-cache static export (buffers bound in place)", _always,
                 lambda w, t: _prepare_ort(w, t, kv_cache="static")))
register(Backend("genai-static", "genai backend on a --kv-cache static export (past_present_share_buffer)",
                 _genai_available, lambda w, t: _prepare_genai(w, t, kv_cache="static")))
register(Backend("ort-cuda", "ONNX Runtime CUDA EP", _ort_cuda_available,
                 lambda w, t: _prepare_ort(w, t, "CUDAExecutionProvider")))
