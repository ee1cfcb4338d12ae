"""``dsmoe.bench``: the benchmark harness, installed from ``benchmarks/`` (results beside it).

``dsmoe bench`` (:func:`run_bench`) measures every artifact the product makes — the eager model,
the fused graph, the ONNX export made by :func:`dsmoe.export.export_module` / ``dsmoe-export`` —
against each other and against this machine's measured limits, in one process.

Pieces: :mod:`.harness` (the run), :mod:`.suites` (what is measured), :mod:`.backends` (the
registry), :mod:`.timing` (method, cross-check), :mod:`.limits` (bandwidth, GEMM rate, floors),
:mod:`.report` (table and files).
"""

from dsmoe.bench.harness import DEFAULT_BACKENDS, GOALS, SIZES, evaluate_goals, gpu_goals, run_bench
from dsmoe.bench.suites import SUITES

__all__ = ["DEFAULT_BACKENDS", "GOALS", "SIZES", "SUITES", "evaluate_goals", "gpu_goals", "run_bench"]
