"""What every pass takes (:class:`PassContext`) and returns (:class:`PassResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from dsmoe.config import DeepseekConfig


@dataclass
class PassContext:
    """Options of one pipeline run.

    ``config`` defaults to the one :func:`dsmoe.ir.capture` stored on the graph.
    ``fold_shared_experts`` turns on the optional pass that folds shared experts into
    ``dsmoe::moe``; ``absorb_mla`` (on by default) rewrites MLA attention into the absorbed
    ``dsmoe::mla_attention``. ``router_stats`` turns on ``expose_router``, which adds the routers'
    choices to the graph's outputs (``(logits, present, router)``). ``verify`` runs the graph
    before and after every pass on seeded inputs.
    """

    config: DeepseekConfig | None = None
    fold_shared_experts: bool = False
    router_stats: bool = False
    absorb_mla: bool = True
    verify: bool = False
    verify_seed: int = 0
    expert_shard: Any = None  # passes.shard_experts.ExpertShard: only the shard_experts deployment step reads it

    def config_of(self, gm: GraphModule) -> DeepseekConfig:
        cfg = self.config or gm.meta.get("dsmoe_config")
        if cfg is None:
            raise ValueError("no model config: pass PassContext(config=...) or capture with dsmoe.ir.capture")
        return cfg


@dataclass
class PassResult:
    """How many rewrites a pass made, and the regions it left alone (with the reason)."""

    rewrites: int = 0
    skipped: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(f"{where}: {reason}")
