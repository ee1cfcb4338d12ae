"""The ordered pass list and the pipeline that runs (and verifies) it.

Order, and why:

1. ``fuse_router`` first: ``outline_moe`` then consumes ``dsmoe::route``'s int32 ids directly
   (it still works on an unfused router, reading the topk ids).
2. ``outline_moe`` before ``fuse_gated_mlp``: the routed experts are SwiGLU MLPs too;
   ``fuse_gated_mlp`` skips them by path, but outlining first leaves it nothing to skip.
3. ``fuse_gated_mlp``: shared experts and dense MLPs.
4. ``absorb_mla`` (MLA models; on unless ``PassContext.absorb_mla`` is False): attention
   scopes only, independent of the MoE passes; listed after them so that an MHA model's
   report is the three MoE passes.
5. ``fold_shared_experts`` (optional, ``PassContext.fold_shared_experts``): it needs both
   the ``dsmoe::moe`` of step 2 and the shared ``dsmoe::gated_mlp`` of step 3.
6. ``expose_router`` (optional, ``PassContext.router_stats``) last: it exposes the final graph's
   ``dsmoe::route`` outputs (and the moe / shared outputs' norms where they are still separate);
   it adds outputs and changes nothing else, so every pass before it sees the plain decoder.

Not listed: ``shard_experts`` (expert parallelism) is a deployment step that needs a live process
group; :mod:`dsmoe.app.ep_rank` runs it on each rank after this pipeline.

With ``ctx.verify`` the graph runs on seeded prefill and single-token decode inputs before the
first pass and after every pass; an output beyond the dtype's tolerance raises
:class:`VerificationError` naming the pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.fx import GraphModule

from dsmoe.dtypes import VERIFY_RTOL
from dsmoe.errors import DsmoeError
from dsmoe.ir import node_count, op_histogram, param_bytes, sample_inputs
from dsmoe.passes.absorb_mla import absorb_mla
from dsmoe.passes.context import PassContext, PassResult
from dsmoe.passes.expose_router import expose_router
from dsmoe.passes.fold_shared_experts import fold_shared_experts
from dsmoe.passes.fuse_gated_mlp import fuse_gated_mlp
from dsmoe.passes.fuse_router import fuse_router
from dsmoe.passes.outline_moe import outline_moe

Pass = Callable[[GraphModule, PassContext], PassResult]

PASSES: list[tuple[str, Pass]] = [
    ("fuse_router", fuse_router),
    ("outline_moe", outline_moe),  # consumes route's ids (1)
    ("fuse_gated_mlp", fuse_gated_mlp),  # after outline_moe (2)
    ("absorb_mla", absorb_mla),  # MLA attention only, independent of the MoE passes (4)
    ("fold_shared_experts", fold_shared_experts),  # optional; needs moe + gated_mlp (5)
    ("expose_router", expose_router),  # optional; last, it adds graph outputs (6)
]
OPTIONAL = {"fold_shared_experts": "fold_shared_experts", "absorb_mla": "absorb_mla",
            "expose_router": "router_stats"}  # pass -> PassContext flag
# passes that apply only to some models (not run, nor reported, for the others)
APPLIES = {"absorb_mla": lambda config: config.is_mla}



class VerificationError(DsmoeError):
    exit_code = 1


@dataclass
class PassReport:
    name: str
    rewrites: int
    nodes_before: int
    nodes_after: int
    param_bytes: int
    max_abs_err: float | None
    rel_err: float | None
    seconds: float
    skipped: list[str]


def pass_names(ctx: PassContext | None = None, config=None) -> list[str]:
    """The passes a pipeline with ``ctx`` runs (on a model with ``config``, when given)."""
    ctx = ctx or PassContext()
    return [name for name, _ in PASSES if (name not in OPTIONAL or getattr(ctx, OPTIONAL[name]))
            and (config is None or name not in APPLIES or APPLIES[name](config))]


def run_pipeline(gm: GraphModule, ctx: PassContext | None = None,
                 on_pass: Callable[[PassReport, GraphModule], None] | None = None) -> tuple[GraphModule, list[PassReport]]:
    """Run the enabled passes in order; returns the (in-place rewritten) graph and one report per pass."""
    ctx = ctx or PassContext()
    config = ctx.config or gm.meta.get("dsmoe_config")
    enabled = pass_names(ctx, config)
    checker = _Verifier(gm, ctx) if ctx.verify else None
    reports = []
    for name, fn in PASSES:
        if name not in enabled:
            continue
        before = node_count(gm)
        t = time.perf_counter()
        result = fn(gm, ctx)
        seconds = time.perf_counter() - t
        abs_err, rel_err = checker.check(name) if checker else (None, None)
        rep = PassReport(name, result.rewrites, before, node_count(gm), param_bytes(gm), abs_err, rel_err,
                         seconds, result.skipped)
        reports.append(rep)
        if on_pass:
            on_pass(rep, gm)
    return gm, reports


class _Verifier:
    """Runs the graph on fixed seeded inputs; compares every later run with the first."""

    def __init__(self, gm: GraphModule, ctx: PassContext):
        config = ctx.config_of(gm)
        dtype = gm.meta.get("dsmoe_dtype", torch.float32)
        device = next(iter(gm.parameters())).device
        self.gm, self.tol = gm, VERIFY_RTOL[dtype]
        self.inputs = [sample_inputs(config, batch=2, seq=7, past=0, seed=ctx.verify_seed, dtype=dtype, device=device),
                       sample_inputs(config, batch=2, seq=1, past=6, seed=ctx.verify_seed + 1, dtype=dtype, device=device)]
        self.refs = self._run()
        if not all(bool(torch.isfinite(r).all()) for r in self.refs):
            raise VerificationError("the captured graph's outputs are not finite (NaN/Inf) before any pass: "
                                    "there is nothing to verify the passes against (check the weights)")

    @torch.no_grad()
    def _run(self) -> list[torch.Tensor]:
        return [self.gm(*args)[0].float() for args in self.inputs]

    def check(self, name: str) -> tuple[float, float]:
        abs_err = rel_err = 0.0
        for ref, out in zip(self.refs, self._run()):
            if not bool(torch.isfinite(out).all()):
                raise VerificationError(f"pass {name} made the model's outputs non-finite (NaN/Inf)")
            err = (out - ref).abs().max().item()
            abs_err = max(abs_err, err)
            rel_err = max(rel_err, err / max(ref.abs().max().item(), 1e-12))
        if not rel_err <= self.tol:
            raise VerificationError(f"pass {name} changed the model's outputs: max abs error {abs_err:.3g} "
                                    f"(relative {rel_err:.3g} > tolerance {self.tol:g})")
        return abs_err, rel_err


def report_json(reports: list[PassReport], gm: GraphModule) -> dict:
    """The ``dsmoe inspect --json`` document."""
    return {"passes": [asdict(r) for r in reports], "ops": op_histogram(gm)}
