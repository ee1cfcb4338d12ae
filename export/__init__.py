"""``dsmoe.export``: per-target lowering of the fused IR, ONNX writing, ONNX Runtime runner.

- :func:`export_model` — ``SOURCE`` → output dir with ``model.onnx``, ``config.json``,
  ``export_report.json`` (what ``dsmoe export`` / ``dsmoe-export`` call).
- :func:`export_module` — the one ONNX export path (the decoder, and the benchmarks' single layer).
- :class:`OrtDecoder` — an exported directory as a decoder step function with the KV cache.
- :func:`lower` — the per-target lowering tables (``ort``, ``portable``, ``tensorrt``).
- :data:`KV_CACHE_MODES` — ``dynamic`` and ``static`` (GenAI's shared past/present buffer).
- :func:`check_genai_config` — ``genai_config.json`` read back against its model;
  :class:`~dsmoe.export.genai_runner.GenaiModel` runs an export in onnxruntime-genai.
- :func:`build_engine`, :class:`TrtDecoder` — a ``tensorrt`` export's engine and decoder step
  (TensorRT Python API, where it is installed).
"""

from dsmoe.export.api import REPORT_FILE, VerificationError, export_model, verify_export
from dsmoe.export.genai_config import GENAI_CONFIG, check_genai_config
from dsmoe.export.lower import LOWERINGS, TARGETS, LoweringError, lower
from dsmoe.export.onnx_writer import DATA_FILE, MODEL_FILE, OPSET, export_layer, export_module, io_names, op_histogram
from dsmoe.export.runner import OrtDecoder, polygraphy_command, session
from dsmoe.export.static_cache import KV_CACHE_MODES
from dsmoe.export.tensorrt import ENGINE_FILE, TensorRTUnavailable, TrtDecoder, build_engine

__all__ = [
           "DATA_FILE",
           "ENGINE_FILE",
           "GENAI_CONFIG",
           "KV_CACHE_MODES",
           "LOWERINGS",
           "MODEL_FILE",
           "OPSET",
           "REPORT_FILE",
           "TARGETS",
           "LoweringError",
           "OrtDecoder",
           "TensorRTUnavailable",
           "TrtDecoder",
           "VerificationError",
           "build_engine",
           "check_genai_config",
           "export_layer",
           "export_model",
           "export_module",
           "io_names",
           "lower",
           "op_histogram",
           "polygraphy_command",
           "session",
           "verify_export",
]
