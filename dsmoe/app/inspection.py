"""``dsmoe inspect``: capture, run the passes with verification, report what each pass did."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import dsmoe
from dsmoe.app.device import cpu_kernels
from dsmoe.errors import DsmoeError
from dsmoe.ir import summary, timed_capture
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import PASSES, report_json, run_pipeline


def run_inspect(*, source: str, dump_after: str | None = None, fold_shared_experts: bool = False,
                absorb_mla: bool = True, verify: bool = True,
                dtype: str | None = None, overrides: dict | None = None, dump: Callable[[str], None] = print,
                status: Callable = lambda text: nullcontext(), kernels: str = "reference",
                allow_nonfinite: bool = False) -> dict:
    """Returns ``{"passes": [...], "ops": {...}, "captured_nodes", "captured_param_bytes",
    "captured_nodes_per_layer", "capture_seconds", "kernels"}``. With ``kernels="triton-interpret"``
    the per-pass verification runs the fused ops through the interpreted Triton kernels."""
    with cpu_kernels(kernels):
        doc = _inspect(source, dump_after, fold_shared_experts, absorb_mla, verify, dtype, overrides, dump, status,
                       allow_nonfinite)
    doc["kernels"] = kernels
    return doc


def _inspect(source, dump_after, fold_shared_experts, absorb_mla, verify, dtype, overrides, dump, status,
             allow_nonfinite) -> dict:
    names = [n for n, _ in PASSES]
    if dump_after is not None and dump_after not in names:
        raise DsmoeError(f"unknown pass {dump_after!r} for --dump-after (passes: {', '.join(names)})")
    config = dsmoe.load_config(source, overrides)
    if not absorb_mla and not config.is_mla:
        raise DsmoeError(f"--no-absorb-mla applies to MLA models (deepseek_v2/v3) only; {source} is {config.model_type}")
    with status(f"loading {source}"):
        model = dsmoe.load(source, dtype=dtype, overrides=overrides, allow_nonfinite=allow_nonfinite)
    with status("capturing (torch.export)"):
        gm, seconds = timed_capture(model)
    s = summary(gm)
    captured = dict(captured_nodes=s.nodes, captured_param_bytes=s.params, captured_nodes_per_layer=s.per_layer,
                    capture_seconds=seconds)
    del model

    def on_pass(rep, g):
        if rep.name == dump_after:
            dump(g.print_readable(print_output=False))

    ctx = PassContext(fold_shared_experts=fold_shared_experts or dump_after == "fold_shared_experts",
                      absorb_mla=absorb_mla, verify=verify)
    with status("running passes" + (" with verification" if verify else "")):
        gm, reports = run_pipeline(gm, ctx, on_pass=on_pass)
    doc = report_json(reports, gm)
    doc.update(captured)
    return doc

