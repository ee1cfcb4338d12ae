"""DeepSeek routing, once: the parameters (:class:`RoutingSpec`) and the math (:func:`route`).

The reference model's router, the CPU implementation of ``dsmoe::route`` and the ONNX lowering
all call :func:`route`; the pass that creates ``dsmoe::route`` nodes and the lowerings that read
them go through :meth:`RoutingSpec.from_node`. Outputs are ``(weights [T,K] fp32, ids [T,K]
int32)`` everywhere (the op's contract).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCALE_WHEN = ("always", "unnormalized")


@dataclass(frozen=True)
class RoutingSpec:
    """Everything ``dsmoe::route`` needs, resolved from the config (one place for family rules).

    ``norm_topk_prob`` is the *effective* flag: V1/V2 renormalize only when top_k > 1, V3
    (``noaux_tc``) always. ``scale_when`` is ``"always"`` for V3 and ``"unnormalized"`` for V1/V2
    (V2 multiplies by ``routed_scaling_factor`` only in the branch that does not renormalize).
    The field names are the keyword names of ``dsmoe::route``.
    """

    scoring: str
    topk_method: str
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    scaling: float
    scale_when: str

    @property
    def group_limited(self) -> bool:
        """Whether experts are chosen within the best ``topk_group`` of ``n_group`` groups."""
        return is_group_limited(self.topk_method, self.n_group)

    @property
    def scaled(self) -> bool:
        """Whether the weights are multiplied by ``scaling``."""
        return is_scaled(self.norm_topk_prob, self.scale_when)

    def as_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> RoutingSpec:
        """The spec of a ``dsmoe::route`` node, read by argument *name* from the op's schema."""
        schema = node.target._schema
        bound = {a.name: v for a, v in zip(schema.arguments, node.args)} | dict(node.kwargs)
        return cls(**{f.name: bound[f.name] for f in dataclasses.fields(cls)})


def is_group_limited(topk_method: str, n_group: int) -> bool:
    return topk_method != "greedy" and n_group > 1


def is_scaled(norm_topk_prob: bool, scale_when: str) -> bool:
    return scale_when == "always" or not norm_topk_prob


def route(x_TH: torch.Tensor, w_gate_EH: torch.Tensor, bias_E: torch.Tensor | None, *, scoring: str,
          topk_method: str, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float,
          scale_when: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing in fp32; returns ``(weights [T,K] fp32, ids [T,K] int32)``.

    1. logits = x·W_gateᵀ; scores = softmax (V1/V2) or sigmoid (V3)
    2. choice = scores (+ correction bias for V3: selection only)
    3. group-limited methods: group score = max (V2) or sum of top-2 (V3) of ``choice`` per group;
       keep the best ``topk_group`` groups, mask the others with −inf
    4. ids = top-K of choice; weights = *unbiased* scores at ids
    5. normalize (w /= Σw + 1e-20) if ``norm_topk_prob``; scale by ``scaling`` always (V3) or only
       when not normalized (V1/V2)
    """
    logits = F.linear(x_TH.float(), w_gate_EH.float())
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if bias_E is None else scores + bias_E.float()
    if is_group_limited(topk_method, n_group):
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.topk(group_scores, topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if is_scaled(norm_topk_prob, scale_when):
        weights = weights * scaling
    return weights, ids.to(torch.int32)
