"""What the eager model's routers chose, call by call: forward hooks on every MoE block.

:class:`RouterHooks` records, for each forward call of the model, the same values the fused
graph exposes with the ``expose_router`` pass (and an ONNX export with ``--router-stats``)::

    {layer: {"ids": [T,K] int32, "weights": [T,K] fp32,
             "routed_norm": [T] fp32, "shared_norm": [T] fp32}}

``T = B·S`` tokens in row order ``b·S + s`` (the router's ``x_TH``). ``routed_norm`` and
``shared_norm`` are the L2 norms of each token's routed and shared-experts contribution to the
MoE output, in fp32; the routed one is the block's output minus the shared output (exact in
fp32; within the dtype's rounding in fp16/bf16). A model without shared experts has no
``shared_norm``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsmoe.model import DeepseekMoE

Router = dict[int, dict[str, Tensor]]


class RouterHooks:
    """Forward hooks on the MoE blocks of ``model``; :meth:`pop` returns what the calls since the
    last pop recorded (one call: one router dict). Use as a context manager to remove the hooks."""

    def __init__(self, model: nn.Module):
        self._current: Router = {}
        self._handles = []
        for i, layer in enumerate(model.model.layers):
            moe = layer.mlp
            if not isinstance(moe, DeepseekMoE):
                continue
            self._handles.append(moe.gate.register_forward_hook(self._on_gate(i)))
            if moe.shared_experts is not None:
                self._handles.append(moe.shared_experts.register_forward_hook(self._on_shared(i)))
            self._handles.append(moe.register_forward_hook(self._on_block(i)))
        self.layers = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, DeepseekMoE)]

    def _on_gate(self, i: int):
        def hook(module, args, output):
            w_TK, ids_TK = output
            self._current.setdefault(i, {}).update(ids=ids_TK.detach(), weights=w_TK.detach().float())
        return hook

    def _on_shared(self, i: int):
        def hook(module, args, output):
            self._current.setdefault(i, {})["_shared"] = output.detach().float()
        return hook

    def _on_block(self, i: int):
        def hook(module, args, output):
            rec = self._current.setdefault(i, {})
            y = output.detach().reshape(-1, output.shape[-1]).float()
            shared = rec.pop("_shared", None)
            routed = y if shared is None else y - shared
            rec["routed_norm"] = torch.linalg.vector_norm(routed, dim=-1)
            if shared is not None:
                rec["shared_norm"] = torch.linalg.vector_norm(shared, dim=-1)
        return hook

    def pop(self) -> Router:
        """The router values recorded since the last pop (layer order)."""
        got, self._current = self._current, {}
        return {i: got[i] for i in sorted(got)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RouterHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
