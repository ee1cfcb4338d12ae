"""Launcher of the ``dsmoe::route`` CUDA kernel (``route.cu``).

``route_cuda(x [T,H], w_gate [E,H], bias [E]?, **attrs) -> (weights [T,K] fp32, ids [T,K] int32)``
with the attributes of ``dsmoe::route``. Attributes are checked up front by
:func:`validate_route_attrs`, which needs no GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from dsmoe.plugins import build

SCORINGS = {"softmax": 0, "sigmoid": 1}
TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}  # config.py resolves aliases
SCALE_WHEN = ("always", "unnormalized")
DTYPE_TAGS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
WARPS = 8
TOKENS_PER_CTA = 8   # large T: each W_gate row read from L2 serves 8 tokens
SMALL_T = 256        # below this, one token per CTA so that more CTAs run
SMEM_LIMIT = 48 * 1024
# The 48 KiB default limit covers static + dynamic shared memory: route.cu also has a static
# `__shared__ int is_last` (ptxas reports 16 bytes), so the dynamic part must leave room for it.
STATIC_SMEM_RESERVE = 64
DYNAMIC_SMEM_LIMIT = SMEM_LIMIT - STATIC_SMEM_RESERVE
MAX_TOP_K = 32       # one lane per selected expert
MAX_GROUPS = 32      # one lane per group
# kernel arguments (build.Module.launch codes): x, w, bias, weights, ids, logits_ws, counters,
# T, H, E, K, S, vec, scoring, method, G, TG, normalize, scaling, scale_always
ROUTE_SIG = "ppppppp" + "iiiiiiiiiii" + "fi"


@dataclass(frozen=True)
class RouteLaunch:
    """Everything the kernel needs besides pointers (integer codes as in route.cu)."""

    T: int
    H: int
    E: int
    K: int
    scoring: int
    method: int
    n_group: int
    topk_group: int
    normalize: bool
    scaling: float
    scale_always: bool
    tokens_per_cta: int
    splits: int = 1  # S: CTAs per token block, each computing E/S experts' logits

    @property
    def smem_bytes(self) -> int:
        return 2 * self.tokens_per_cta * self.E * 4

    @property
    def token_blocks(self) -> int:
        return -(-self.T // self.tokens_per_cta)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.token_blocks, self.splits, 1)

    def with_splits(self, num_sms: int) -> RouteLaunch:
        """Split the experts over CTAs while the token blocks alone leave SMs idle (decode)."""
        blocks = self.token_blocks
        if blocks == 0 or blocks >= num_sms:
            return self
        s = min(-(-2 * num_sms // blocks), max(1, self.E // WARPS))  # >= 1 expert per warp
        return dataclasses.replace(self, splits=max(1, s))


def validate_route_attrs(T: int, H: int, E: int, *, scoring: str, topk_method: str, top_k: int,
                         n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float,
                         scale_when: str) -> RouteLaunch:
    """Check the op's attributes against the shapes; return the launch parameters or raise ValueError."""
    if scoring not in SCORINGS:
        raise ValueError(f"dsmoe::route: unknown scoring {scoring!r} (supported: {', '.join(SCORINGS)})")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"dsmoe::route: unknown topk_method {topk_method!r} (supported: {', '.join(TOPK_METHODS)})")
    if scale_when not in SCALE_WHEN:
        raise ValueError(f"dsmoe::route: unknown scale_when {scale_when!r} (supported: {', '.join(SCALE_WHEN)})")
    if E < 1 or H < 1:
        raise ValueError(f"dsmoe::route: need E >= 1 and H >= 1, got E={E}, H={H}")
    if not 1 <= top_k <= min(E, MAX_TOP_K):
        raise ValueError(f"dsmoe::route: top_k must lie in [1, min(E, {MAX_TOP_K})], got {top_k} with E={E}")
    method = TOPK_METHODS[topk_method]
    grouped = method != 0 and n_group > 1
    if grouped:
        if n_group > MAX_GROUPS or E % n_group:
            raise ValueError(f"dsmoe::route: n_group must divide E and be <= {MAX_GROUPS}, got n_group={n_group}, E={E}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"dsmoe::route: topk_group must lie in [1, n_group={n_group}], got {topk_group}")
        if top_k > topk_group * (E // n_group):
            raise ValueError(f"dsmoe::route: top_k={top_k} exceeds the {topk_group * (E // n_group)} experts "
                             f"of the kept groups")
        if method == 2 and E // n_group < 2:
            raise ValueError("dsmoe::route: noaux_tc scores a group by its top-2 experts: need E/n_group >= 2")
    tpc = TOKENS_PER_CTA if T >= SMALL_T and 2 * TOKENS_PER_CTA * E * 4 <= DYNAMIC_SMEM_LIMIT else 1
    if 2 * tpc * E * 4 > DYNAMIC_SMEM_LIMIT:
        raise ValueError(f"dsmoe::route: E={E} is too large for the kernel (at most {DYNAMIC_SMEM_LIMIT // 8})")
    return RouteLaunch(T=T, H=H, E=E, K=top_k, scoring=SCORINGS[scoring], method=method,
                       n_group=n_group if grouped else 1, topk_group=topk_group if grouped else 1,
                       normalize=bool(norm_topk_prob), scaling=float(scaling),
                       scale_always=scale_when == "always", tokens_per_cta=tpc)


def route_cuda(x: Tensor, w_gate: Tensor, bias: Tensor | None, scoring: str, topk_method: str,
               top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool, scaling: float,
               scale_when: str) -> tuple[Tensor, Tensor]:
    """CUDA ``dsmoe::route`` (same signature as the op)."""

    if x.dim() != 2 or w_gate.dim() != 2 or x.shape[1] != w_gate.shape[1]:
        raise ValueError(f"dsmoe::route: want x [T,H] and w_gate [E,H], got {tuple(x.shape)} and {tuple(w_gate.shape)}")
    T, H = x.shape
    E = w_gate.shape[0]
    # 1. validate attributes and pick the launch shape
    p = validate_route_attrs(T, H, E, scoring=scoring, topk_method=topk_method, top_k=top_k,
                             n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                             scaling=scaling, scale_when=scale_when)
    # 2. operands: contiguous, supported dtypes, bias in fp32
    x = _as_supported(x).contiguous()
    w_gate = w_gate.contiguous() if w_gate.dtype in (x.dtype, torch.float32) else w_gate.float().contiguous()
    if bias is not None:
        if bias.shape != (E,):
            raise ValueError(f"dsmoe::route: bias must be [E]={E}, got {tuple(bias.shape)}")
        bias = bias.to(device=x.device, dtype=torch.float32).contiguous()
    weights = torch.empty((T, top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=x.device)
    if T == 0:
        return weights, ids
    # 3. expert splits for small T, workspace (logits [T,E] fp32 + zeroed counters) when split
    p = p.with_splits(_num_sms(x.device))
    logits_ws = counters = None
    if p.splits > 1:
        logits_ws = torch.empty((T, E), dtype=torch.float32, device=x.device)
        counters = torch.zeros(p.token_blocks, dtype=torch.int32, device=x.device)
    vec = H % (16 // w_gate.element_size()) == 0 and x.data_ptr() % 16 == 0 and w_gate.data_ptr() % 16 == 0
    # 4. launch: grid (token blocks, splits), 8 warps
    kernel = f"route_{DTYPE_TAGS[x.dtype]}_{DTYPE_TAGS[w_gate.dtype]}_t{p.tokens_per_cta}"
    build.load("route", x.device).launch(
        kernel, p.grid, (WARPS * 32,), ROUTE_SIG,
        (x, w_gate, bias, weights, ids, logits_ws, counters, T, H, E, p.K, p.splits, int(vec), p.scoring,
         p.method, p.n_group, p.topk_group, int(p.normalize), p.scaling, int(p.scale_always)),
        smem=p.smem_bytes)
    return weights, ids


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _as_supported(t: Tensor) -> Tensor:
    return t if t.dtype in DTYPE_TAGS else t.float()
