"""The routers' choices from every backend, through one signature.

A *router step* is a decoder step that also returns the routers' choices:
``step(input_ids, attention_mask, position_ids, past) -> (logits, present, router)`` with
``router = {layer: {"ids" [T,K] int32, "weights" [T,K] fp32, "routed_norm" [T], "shared_norm" [T]}}``
(``T = B·S``). The eager model gives one through forward hooks (:class:`dsmoe.router_hooks.RouterHooks`),
the fused graph through the ``expose_router`` pass, an export made with ``--router-stats``
through :class:`dsmoe.export.OrtDecoder`. :func:`tap` turns a router step back into a plain step
function that accumulates into a :class:`RouterTrace` (so :func:`greedy_generate` runs it as is).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsmoe.app.choices import ROUTER_BACKENDS as BACKENDS  # noqa: F401  (re-exported)
from dsmoe.app.expert_stats import RouterTrace
from dsmoe.export import OrtDecoder
from dsmoe.ir import capture
from dsmoe.passes.context import PassContext
from dsmoe.passes.pipeline import run_pipeline
from dsmoe.router_hooks import RouterHooks

RouterStep = Callable[..., tuple]


class EagerRouterStep:
    """The eager model with hooks on its MoE blocks (:meth:`remove` or ``with`` takes them off)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.hooks = model, RouterHooks(model)

    def __call__(self, input_ids, attention_mask, position_ids, past):
        self.hooks.pop()  # nothing from calls made outside this step
        logits, present = self.model(input_ids, attention_mask, position_ids, past, use_cache=True)
        return logits, present, self.hooks.pop()

    def remove(self) -> None:
        self.hooks.remove()

    def __enter__(self) -> EagerRouterStep:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def eager_router_step(model: torch.nn.Module) -> EagerRouterStep:
    """The eager model as a router step (forward hooks)."""
    return EagerRouterStep(model)


def fused_router_step(model: torch.nn.Module, *, fold_shared_experts: bool = False,
                      absorb_mla: bool = True) -> RouterStep:
    """The fused graph with the routers exposed as outputs (``PassContext(router_stats=True)``)."""
    gm, _ = run_pipeline(capture(model), PassContext(fold_shared_experts=fold_shared_experts, router_stats=True,
                                                     absorb_mla=absorb_mla))
    return gm


def ort_router_step(export_dir: str | Path, *, threads: int | None = None) -> RouterStep:
    """An export made with ``--router-stats`` in ONNX Runtime."""
    return OrtDecoder(export_dir, threads=threads, router_stats=True)


def tap(step: RouterStep, trace: RouterTrace):
    """A plain step function that records every call's router values into ``trace`` (padded
    positions, ``attention_mask`` 0 over this call's tokens, are left out)."""
    def plain(input_ids, attention_mask, position_ids, past):
        logits, present, router = step(input_ids, attention_mask, position_ids, past)
        S = input_ids.shape[1]
        valid = torch.as_tensor(attention_mask)[:, -S:].reshape(-1).bool()
        trace.add(router, None if bool(valid.all()) else valid)
        return logits, present
    return plain
