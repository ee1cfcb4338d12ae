"""``dsmoe.export``: per-target lowering of the fused IR, ONNX writing, ONNX Runtime runner.

- :func:`export_model` — ``SOURCE`` → output dir with ``model.onnx``, ``config.json``,
  ``export_report.json`` (what ``dsmoe export`` / ``dsmoe-export`` call).
- :class:`OrtDecoder`, :func:`generate_ort` — run an exported directory with the KV cache.
- :func:`lower` — the per-target lowering tables (``ort``, ``portable``).
"""

from dsmoe.export.api import TOLERANCE, VerificationError, export_model, verify_export
from dsmoe.export.lower import LOWERINGS, TARGETS, LoweringError, lower
from dsmoe.export.onnx_writer import io_names, op_histogram
from dsmoe.export.runner import OrtDecoder, generate_ort, session

__all__ = ["export_model", "verify_export", "VerificationError", "TOLERANCE", "OrtDecoder", "generate_ort", "session",
           "lower", "LOWERINGS", "TARGETS", "LoweringError", "io_names", "op_histogram"]
