"""Launch configuration of ``dsmoe::route``: attribute validation and :func:`route_config`, the one
function that picks block sizes, warps and stages for the PyTorch launcher and the AOT build.

Shape letters: T tokens, H hidden, E experts, K experts per token, G groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsmoe.plugins._triton import TYPE_OF_DTYPE, Buffer, Launch

SCORINGS = {"softmax": 0, "sigmoid": 1}
TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}  # config.py resolves aliases
SCALE_WHEN = ("always", "unnormalized")
MAX_E, MAX_K, MAX_G = 256, 8, 8
SMALL_T = 16  # up to here one token block: the expert blocks alone spread W_gate over the SMs
SELECT_BLOCK_T = 16

LOGITS_ARGS = (("x", "*{x}"), ("w", "*{x}"), ("logits", "*fp32"), ("T", "i32"), ("H", "i32"), ("E", "i32"))
SELECT_ARGS = (("logits", "*fp32"), ("bias", "*fp32"), ("weights", "*fp32"), ("ids", "*i32"), ("T", "i32"),
               ("E", "i32"), ("K", "i32"), ("n_group", "i32"), ("topk_group", "i32"), ("scoring", "i32"),
               ("method", "i32"), ("normalize", "i32"), ("scale", "i32"), ("scaling", "fp32"))
# (BLOCK_T, BLOCK_E, BLOCK_H, num_warps) per path; num_stages per arch below
LOGITS_TILES = {"small": (16, 16, 128, 4), "large": (64, 64, 64, 4)}
STAGES = {80: 3, 90: 4}


@dataclass(frozen=True)
class RouteAttrs:
    """The op's attributes as the select kernel's integer codes (validated)."""

    K: int
    n_group: int
    topk_group: int
    scoring: int
    method: int
    normalize: int
    scale: int
    scaling: float


@dataclass(frozen=True)
class RouteConfig:
    path: str          # "small" (T <= 16) or "large"
    logits: Launch
    select: Launch

    @property
    def launches(self) -> tuple[Launch, ...]:
        return (self.logits, self.select)

    @property
    def buffers(self) -> tuple[Buffer, ...]:
        """The workspace between the two launches (the launcher and the TensorRT plugin size it here)."""
        return (Buffer("logits", "fp32", "T*E"),)


def route_config(T: int, E: int, K: int, H: int, dtype: torch.dtype, arch: int) -> RouteConfig:
    """The launch configuration for routing T tokens of width H over E experts (K per token)."""
    del K, H  # the tiles do not depend on them; kept in the signature shared by every op
    if dtype not in TYPE_OF_DTYPE:
        raise ValueError(f"dsmoe::route: unsupported dtype {dtype} (supported: float32, bfloat16, float16)")
    path = "small" if T <= SMALL_T else "large"
    bt, be, bh, warps = LOGITS_TILES[path]
    stages = STAGES.get(arch, 3)
    e_pad = 64 if E <= 64 else MAX_E
    logits = Launch("route_logits_kernel", LOGITS_ARGS,
                    (("BLOCK_T", bt), ("BLOCK_E", be), ("BLOCK_H", bh)), warps, stages,
                    (f"cdiv(T, {bt})", f"cdiv(E, {be})", "1"))
    select = Launch("route_select_kernel", SELECT_ARGS,
                    (("BLOCK_T", SELECT_BLOCK_T), ("E_PAD", e_pad), ("K_PAD", MAX_K), ("G_PAD", MAX_G)),
                    4, 1, (f"cdiv(T, {SELECT_BLOCK_T})", "1", "1"))
    return RouteConfig(path, logits, select)


def route_rule(cfg: RouteConfig) -> str:
    """The condition on the runtime sizes under which :func:`route_config` returns ``cfg`` (for the
    AOT manifest: a TensorRT plugin evaluates it instead of re-implementing the choice)."""
    e_pad = dict(cfg.select.constexprs)["E_PAD"]
    t = f"T <= {SMALL_T}" if cfg.path == "small" else f"T > {SMALL_T}"
    return f"{t} and " + ("E <= 64" if e_pad == 64 else "E > 64")


def all_route_configs(arch: int) -> list[RouteConfig]:
    """Every configuration :func:`route_config` can return for ``arch`` (the AOT build list)."""
    seen = {}
    for T in (1, SMALL_T + 1):
        for E in (64, MAX_E):
            cfg = route_config(T, E, 1, 1, torch.float32, arch)
            seen[cfg] = None
    return list(seen)


def validate_route(T: int, H: int, E: int, *, scoring: str, topk_method: str, top_k: int, n_group: int,
                   topk_group: int, norm_topk_prob: bool, scaling: float, scale_when: str) -> RouteAttrs:
    """Check the op's attributes against the shapes; return the kernel codes or raise ValueError."""
    if scoring not in SCORINGS:
        raise ValueError(f"dsmoe::route: unknown scoring {scoring!r} (supported: {', '.join(SCORINGS)})")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"dsmoe::route: unknown topk_method {topk_method!r} (supported: {', '.join(TOPK_METHODS)})")
    if scale_when not in SCALE_WHEN:
        raise ValueError(f"dsmoe::route: unknown scale_when {scale_when!r} (supported: {', '.join(SCALE_WHEN)})")
    if not 1 <= E <= MAX_E or H < 1 or T < 0:
        raise ValueError(f"dsmoe::route: need 1 <= E <= {MAX_E} and H >= 1, got E={E}, H={H}")
    if not math.isfinite(scaling):
        raise ValueError(f"dsmoe::route: scaling must be a finite number, got {scaling}")
    if n_group < 1 or topk_group < 1:
        raise ValueError(f"dsmoe::route: n_group and topk_group must be >= 1, got {n_group}, {topk_group}")
    if not 1 <= top_k <= min(E, MAX_K):
        raise ValueError(f"dsmoe::route: top_k must lie in [1, min(E, {MAX_K})], got {top_k} with E={E}")
    method = TOPK_METHODS[topk_method]
    grouped = method != 0 and n_group > 1
    if grouped:
        if n_group > MAX_G or E % n_group:
            raise ValueError(f"dsmoe::route: n_group must divide E and be <= {MAX_G}, got n_group={n_group}, E={E}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"dsmoe::route: topk_group must lie in [1, n_group={n_group}], got {topk_group}")
        if top_k > topk_group * (E // n_group):
            raise ValueError(f"dsmoe::route: top_k={top_k} exceeds the {topk_group * (E // n_group)} experts "
                             "of the kept groups")
        if method == 2 and E // n_group < 2:
            raise ValueError("dsmoe::route: noaux_tc scores a group by its top-2 experts: need E/n_group >= 2")
    return RouteAttrs(K=top_k, n_group=n_group if grouped else 1, topk_group=topk_group if grouped else 1,
                      scoring=SCORINGS[scoring], method=method, normalize=int(bool(norm_topk_prob)),
                      scale=int(scale_when == "always" or not norm_topk_prob), scaling=float(scaling))
