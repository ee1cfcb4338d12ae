"""The ``tensorrt`` target beyond the ONNX graph: the export directory's TensorRT files, the engine
build and the decoder step, with the TensorRT Python API where it is installed.

An export directory of the target holds, beside ``model.onnx``: the plugin library
(``libdsmoe_trt_plugins.so``, whose creators the DsRoute/DsMoE nodes name), ``plugins.json`` (its
plugins and fields) and ``build_engine.sh`` (the ``trtexec`` and ``polygraphy convert`` command
lines, one optimization profile over batch, sequence and past). :func:`build_engine` does the same
with the TensorRT Python API (``IPluginRegistry.load_library``, the ONNX parser, the profile);
:class:`TrtDecoder` loads the library beside the engine and runs the engine as a decoder step with
the KV cache, the signature :class:`dsmoe.export.OrtDecoder` has. ``import tensorrt`` happens only
there; without it they refuse in one line (:class:`TensorRTUnavailable`).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import torch
from dsmoe.export.onnx_writer import MODEL_FILE, REPORT_FILE, io_names
from dsmoe.export.runner import ExportRunError, check_config_unchanged
from dsmoe.plugins.trt.build import PluginBuild
from dsmoe.plugins.trt.spec import LIBRARY, ONNX_DOMAIN, PLUGINS

from dsmoe import load_config
from dsmoe.cache import cache_layout
from dsmoe.errors import DsmoeError

ENGINE_FILE = "model.engine"
SCRIPT_FILE = "build_engine.sh"
PLUGINS_FILE = "plugins.json"
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_LENGTH = 2048
_TORCH_DTYPE = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16", torch.int64: "INT64",
                torch.int32: "INT32"}


# The standard ops TensorRT's ONNX parser imports, opsets 9 to 24 (onnx-tensorrt docs/operators.md,
# TensorRT 10.15; the rows marked Y). Any other op type would go to its plugin fallback and fail.
TRT_OPSETS = (9, 24)
TRT_PARSER_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow",
    "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN",
    "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min",
    "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus",
    "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan", "Scatter",
    "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
    "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh",
    "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where",
    "Xor",
})


def check_parser_support(ops: dict[str, int], opset: int) -> None:
    """The written graph holds only what TensorRT's ONNX parser takes: its standard ops at a
    supported opset, and the dsmoe plugin nodes (``trt.plugins::DsRoute``/``DsMoE``)."""
    plugins = {f"{ONNX_DOMAIN}::{p.name}" for p in PLUGINS.values()}
    bad = sorted(op for op in ops if op not in TRT_PARSER_OPS and op not in plugins)
    if bad or not TRT_OPSETS[0] <= opset <= TRT_OPSETS[1]:
        raise DsmoeError(f"the tensorrt export holds what TensorRT's ONNX parser cannot import: "
                         f"{', '.join(bad) or f'opset {opset}'} (a dsmoe bug: please report it)")


class TensorRTUnavailable(DsmoeError):
    """The TensorRT Python package (or a GPU for it) is not here: the step must run where it is."""


def require_tensorrt(what: str):
    """``import tensorrt`` (lazily), or one line saying ``what`` needs it."""
    try:
        import tensorrt  # lazy: optional dependency
    except ImportError as e:
        raise TensorRTUnavailable(f"{what} needs TensorRT, which is not installed here ({e}); run it where "
                                  "TensorRT is, or build the engine there with build_engine.sh") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"{what} needs a CUDA GPU (torch.cuda.is_available() is False)")
    return tensorrt


# ---- the optimization profile and the command lines ----------------------------------------------

def profile(config, *, max_batch: int = DEFAULT_MAX_BATCH, max_length: int | None = None) -> dict:
    """``{input: (min, opt, max)}`` over batch 1..B, sequence 1..L and past 0..L-1, with
    ``attention_mask`` (past + sequence) at most L; opt is decode (one token after L/2)."""
    L = min(DEFAULT_MAX_LENGTH if max_length is None else max_length, config.max_position_embeddings)
    if max_batch < 1 or L < 2:
        raise DsmoeError(f"the TensorRT profile needs max batch >= 1 and max length >= 2, got {max_batch}, {L}")
    half = L // 2
    layout = cache_layout(config)
    shapes = {"input_ids": ([1, 1], [1, 1], [max_batch, L]),
              "attention_mask": ([1, 1], [1, half + 1], [max_batch, L]),
              "position_ids": ([1, 1], [1, 1], [max_batch, L])}
    per_layer = list(zip(*(layout.shapes(b, p) for b, p in ((1, 0), (1, half), (max_batch, L - 1)))))
    for name, (lo, opt, hi) in zip(layout.input_names(), per_layer * layout.layers):
        shapes[name] = (list(lo), list(opt), list(hi))
    return shapes


def engine_commands(shapes: dict, *, fp32: bool) -> dict[str, list[str]]:
    """``trtexec`` and ``polygraphy convert`` argv that build ``model.engine`` in the export directory
    (run there). The network is strongly typed (TensorRT 11 always; the flag for TensorRT 10): the
    ONNX dtypes are the engine's precision. fp32 engines keep TF32 off (the 1e-4 verification
    tolerance): ``--noTF32`` for trtexec; polygraphy leaves it off unless ``--tf32``."""
    def trt_dims(which):
        return ",".join(f"{n}:{'x'.join(map(str, s[which]))}" for n, s in shapes.items())

    def poly_dims(which):
        return [f"{n}:[{','.join(map(str, s[which]))}]" for n, s in shapes.items()]

    trtexec = ["trtexec", f"--onnx={MODEL_FILE}", f"--dynamicPlugins=./{LIBRARY}",
               f"--minShapes={trt_dims(0)}", f"--optShapes={trt_dims(1)}", f"--maxShapes={trt_dims(2)}",
               "--stronglyTyped", f"--saveEngine={ENGINE_FILE}", *(["--noTF32"] if fp32 else [])]
    # polygraphy loads --plugins with ctypes (static registration): the library registers its
    # creators at load when DSMOE_TRT_REGISTER_ON_LOAD=1 and libnvinfer is already loaded
    polygraphy = ["env", "DSMOE_TRT_REGISTER_ON_LOAD=1", "polygraphy", "convert", MODEL_FILE, "--plugins", f"./{LIBRARY}",
                  "--trt-min-shapes", *poly_dims(0), "--trt-opt-shapes", *poly_dims(1), "--trt-max-shapes",
                  *poly_dims(2), "--strongly-typed", "-o", ENGINE_FILE]
    return {"trtexec": trtexec, "polygraphy": polygraphy}


def write_tensorrt_files(out: Path, config, *, dtype: torch.dtype, build: PluginBuild, max_batch: int,
                         max_length: int | None) -> dict:
    """The plugin library, ``plugins.json`` and ``build_engine.sh`` into ``out``; returns the
    report's ``tensorrt`` section (profile, commands, library)."""
    shutil.copy2(build.library, out / LIBRARY)
    shutil.copy2(build.dir / "plugins.json", out / PLUGINS_FILE)
    shapes = profile(config, max_batch=max_batch, max_length=max_length)
    cmds = engine_commands(shapes, fp32=dtype == torch.float32)
    script = ["#!/bin/sh", "# Build a TensorRT engine from this export (written by dsmoe-export --target tensorrt).",
              f"# model.onnx holds DsRoute/DsMoE plugin nodes; {LIBRARY} beside it implements them.",
              "# Usage: sh build_engine.sh [trtexec|polygraphy]   (writes model.engine here)", "set -eu",
              'cd "$(dirname "$0")"', 'tool="${1:-trtexec}"',
              'if [ "$tool" = trtexec ] || [ "$tool" = polygraphy ]; then',
              '  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found: install TensorRT (pip install '
              'tensorrt, or the TensorRT tar/deb from NVIDIA with trtexec on PATH; polygraphy: pip install polygraphy) or run '
              'this script on a machine with a GPU where $tool exists" >&2; exit 127; }', 'fi',
              'case "$tool" in',
              f"  trtexec) exec {shlex.join(cmds['trtexec'])} ;;", f"  polygraphy) exec {shlex.join(cmds['polygraphy'])} ;;",
              '  *) echo "usage: $0 [trtexec|polygraphy]" >&2; exit 2 ;;', "esac", ""]
    (out / SCRIPT_FILE).write_text("\n".join(script))
    return {"library": LIBRARY, "archs": json.loads((build.dir / "build.json").read_text())["archs"],
            "profile": {n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in shapes.items()}, "commands": cmds,
            "engine": None}


def _report(export_dir: Path) -> dict:
    try:
        report = json.loads((export_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        raise DsmoeError(f"{export_dir} has no readable {REPORT_FILE}: export it again") from None
    if report.get("target") != "tensorrt" or not isinstance(report.get("tensorrt"), dict):
        raise DsmoeError(f"{export_dir} is not a TensorRT export (target {report.get('target')!r}); "
                         "export it with: dsmoe-export SOURCE --target tensorrt --out DIR")
    return report


# ---- the engine ------------------------------------------------------------------------------

def build_engine(export_dir: str | Path, *, out: str | Path | None = None, workspace_bytes: int | None = None) -> Path:
    """Build the serialized engine of a TensorRT export (the profile its report records) with the
    TensorRT Python API; returns its path (``model.engine`` in the directory unless ``out``)."""
    d = Path(export_dir)
    report = _report(d)
    return build_engine_from(d, report["tensorrt"]["profile"], fp32=report["dtype"] == "fp32", out=out,
                             workspace_bytes=workspace_bytes)


def build_engine_from(d: Path, shapes: dict, *, fp32: bool, out: str | Path | None = None,
                      workspace_bytes: int | None = None) -> Path:
    """The engine of ``d/model.onnx`` with the plugin library beside it, for the profile ``shapes``
    (``{input: {"min", "opt", "max"}}``)."""
    trt = require_tensorrt("building a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 1. the plugin library into the builder's registry (getCreators, as trtexec --dynamicPlugins)
    if not builder.get_plugin_registry().load_library(str(d / LIBRARY)):
        raise ExportRunError(f"TensorRT could not load {d / LIBRARY}")
    # 2. the network from the ONNX parser (plugin nodes through its plugin fallback)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(d / MODEL_FILE)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportRunError(f"TensorRT's ONNX parser rejected {d / MODEL_FILE}: {errors[:400]}")
    # 3. one optimization profile over batch, sequence and past (the engine runs with the library
    #    beside it loaded, as TrtDecoder does: it is not serialized into the plan)
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for name, s in shapes.items():
        prof.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(prof)
    if fp32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportRunError(f"TensorRT failed to build an engine from {d / MODEL_FILE} (see its log above)")
    path = Path(out) if out else d / ENGINE_FILE
    path.write_bytes(bytes(plan))
    return path


class TrtDecoder:
    """One decoder step of a TensorRT engine: ``(input_ids, attention_mask, position_ids, past) ->
    (logits, present)`` on the GPU, the signature of the eager model and of ``OrtDecoder``."""

    def __init__(self, export_dir: str | Path, *, engine: str | Path | None = None, validate: bool = True):
        d = self.dir = Path(export_dir)
        if validate:  # an export directory of the target (the export's own check runs before its report exists)
            _report(d)
        self.config = load_config(d)
        check_config_unchanged(d)
        trt = self.trt = require_tensorrt("running a TensorRT engine")
        path = Path(engine) if engine else d / ENGINE_FILE
        if not path.is_file():
            raise DsmoeError(f"{path} does not exist: build it with dsmoe-export ... --target tensorrt --engine, "
                             f"or sh {d / SCRIPT_FILE}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.runtime.get_plugin_registry().load_library(str(d / LIBRARY))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportRunError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.layout = cache_layout(self.config)
        self.input_names, self.output_names = io_names(self.layout)
        dtypes = {getattr(trt.DataType, v): k for k, v in _TORCH_DTYPE.items()}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in self.input_names + self.output_names}
        self.dtype = self.dtypes[self.layout.input_names()[0]]
        self.device = torch.device("cuda")

    def __call__(self, input_ids, attention_mask, position_ids, past):
        feeds = [input_ids, attention_mask, position_ids] + [t for layer in past for t in layer]
        keep = []
        for name, t in zip(self.input_names, feeds):
            t = torch.as_tensor(t).to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, _address(t, keep))
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            outs.append(t)
            self.context.set_tensor_address(name, _address(t, keep))
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ExportRunError(f"TensorRT failed running {self.dir / ENGINE_FILE}")
        return outs[0], self.layout.unflatten(outs[1:])


def _address(t: torch.Tensor, keep: list) -> int:
    """A device address for ``t`` (a 16-byte scratch one for an empty tensor, whose pointer may be null)."""
    if t.numel():
        return t.data_ptr()
    scratch = torch.empty(16, dtype=torch.uint8, device=t.device)
    keep.append(scratch)
    return scratch.data_ptr()
