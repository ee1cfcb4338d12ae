"""Launcher of the ``dsmoe::moe`` CUDA kernels (``moe.cu``).

``moe_cuda(x [T,H], weights [T,K] fp32, ids [T,K] int, w13 [E,2I,H], w2 [E,H,I], activation)``
→ ``y [T,H]`` in x's dtype. :func:`plan_moe` (no GPU needed) validates the shapes and picks the
path (tensor-core decode / prefill tiles, or SIMT), the combine mode and the workspace layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from dsmoe.plugins import build

DTYPE_TAGS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# name: (BM rows per block, BN weight rows per CTA, threads)
TILES = {"dec": (16, 64, 128), "pre": (64, 128, 128), "simt": (16, 16, 256)}
PATHS = ("auto", "dec", "pre", "simt")
COMBINES = ("auto", "reduce", "atomic")
DECODE_PAIRS_PER_EXPERT = 8       # avg (token, slot) pairs per expert up to which the decode tiles win
REDUCE_MAX_BYTES = 1 << 30        # above this the per-pair fp32 buffer gives way to atomics
ALIGN_THREADS = 1024
ALIGN = 256
ALIGN_SMEM_LIMIT = 48 * 1024
# kernel arguments (build.Module.launch codes), as declared in moe.cu
ALIGN_SIG = "piiiippp"       # ids, P, E, BM, MB, offsets, block_expert, sorted_pair
GEMM_SIG = "pppppppiii"      # A, W, sorted_pair, block_expert, route_w, act, out, topk, H, I
COMBINE_SIG = "pppiiii"      # out, ids, y, T, K, H, E
CAST_SIG = "ppq"             # y32, y, n


@dataclass(frozen=True)
class MoEPlan:
    T: int
    H: int
    E: int
    K: int
    I: int
    dtype: torch.dtype
    path: str      # "dec", "pre" or "simt"
    combine: str   # "reduce" or "atomic"

    @property
    def P(self) -> int:
        return self.T * self.K

    @property
    def BM(self) -> int:
        return TILES[self.path][0]

    @property
    def max_blocks(self) -> int:
        """MB: an upper bound on Σ_e ceil(count_e / BM) that needs no device sync."""
        return (self.P + min(self.E, self.P) * (self.BM - 1)) // self.BM

    @property
    def gemm1_grid(self) -> tuple[int, int]:
        _, BN, _ = TILES[self.path]
        cols = BN // 2 if self.path != "simt" else BN
        return self.max_blocks, -(-self.I // cols)

    @property
    def gemm2_grid(self) -> tuple[int, int]:
        return self.max_blocks, -(-self.H // TILES[self.path][1])

    def workspace(self) -> dict[str, tuple[int, int, torch.dtype]]:
        """Region name -> (byte offset, element count, dtype); see the drawing in moe.cu."""
        regions = [("offsets", self.E + 1, torch.int32), ("block_expert", self.max_blocks, torch.int32),
                   ("sorted_pair", self.max_blocks * self.BM, torch.int32),
                   ("act", self.max_blocks * self.BM * self.I, self.dtype)]
        if self.combine == "reduce":
            regions.append(("out", self.P * self.H, torch.float32))
        elif self.dtype != torch.float32:
            regions.append(("y32", self.T * self.H, torch.float32))
        out, off = {}, 0
        for name, n, dt in regions:
            out[name] = (off, n, dt)
            off += -(-n * dt.itemsize // ALIGN) * ALIGN
        out["_total"] = (off, 0, torch.uint8)
        return out

    @property
    def workspace_bytes(self) -> int:
        return self.workspace()["_total"][0]


def plan_moe(x_shape, ids_shape, w13_shape, w2_shape, dtype: torch.dtype, activation: str = "silu", *,
             path: str = "auto", combine: str = "auto") -> MoEPlan:
    """Validate shapes and attributes (raise ValueError) and choose path, combine and workspace."""
    if activation != "silu":
        raise ValueError(f"dsmoe::moe: unsupported activation {activation!r} (supported: silu)")
    if dtype not in DTYPE_TAGS:
        raise ValueError(f"dsmoe::moe: unsupported dtype {dtype} (supported: float32, bfloat16, float16)")
    if path not in PATHS or combine not in COMBINES:
        raise ValueError(f"dsmoe::moe: path must be one of {PATHS} and combine one of {COMBINES}")
    if len(x_shape) != 2 or len(ids_shape) != 2 or len(w13_shape) != 3 or len(w2_shape) != 3:
        raise ValueError("dsmoe::moe: want x [T,H], ids [T,K], w13 [E,2I,H], w2 [E,H,I]")
    T, H = x_shape
    K = ids_shape[1]
    E, twoI, H13 = w13_shape
    I = twoI // 2
    if ids_shape[0] != T or H13 != H or twoI % 2 or tuple(w2_shape) != (E, H, I) or K < 1 or E < 1:
        raise ValueError(f"dsmoe::moe: inconsistent shapes x {tuple(x_shape)}, ids {tuple(ids_shape)}, "
                         f"w13 {tuple(w13_shape)}, w2 {tuple(w2_shape)}")
    tc_ok = dtype != torch.float32 and H % 8 == 0 and I % 8 == 0
    if path == "auto":
        path = ("dec" if T * K <= DECODE_PAIRS_PER_EXPERT * E else "pre") if tc_ok else "simt"
    elif path != "simt" and not tc_ok:
        raise ValueError(f"dsmoe::moe: path {path!r} needs bf16/fp16 and H, I multiples of 8 (got {dtype}, H={H}, I={I})")
    if (2 * E + 1) * 4 > ALIGN_SMEM_LIMIT:
        raise ValueError(f"dsmoe::moe: E={E} is too large for moe_align (at most {(ALIGN_SMEM_LIMIT // 4 - 1) // 2})")
    if combine == "auto":
        combine = "reduce" if T * K * H * 4 <= REDUCE_MAX_BYTES else "atomic"
    return MoEPlan(T=T, H=H, E=E, K=K, I=I, dtype=dtype, path=path, combine=combine)


def moe_cuda(x: Tensor, weights: Tensor, ids: Tensor, w13: Tensor, w2: Tensor, activation: str, *,
             path: str | None = None, combine: str | None = None) -> Tensor:
    """CUDA ``dsmoe::moe`` (same signature as the op; ``path``/``combine`` override the choice,
    also through ``$DSMOE_MOE_PATH`` / ``$DSMOE_MOE_COMBINE``)."""

    # 1. validate and plan (path, tiles, combine mode, workspace layout)
    plan = plan_moe(tuple(x.shape), tuple(ids.shape), tuple(w13.shape), tuple(w2.shape), x.dtype, activation,
                    path=path or os.environ.get("DSMOE_MOE_PATH", "auto"),
                    combine=combine or os.environ.get("DSMOE_MOE_COMBINE", "auto"))
    if tuple(weights.shape) != tuple(ids.shape):  # the kernels index weights by pair id t·K + k
        raise ValueError(f"dsmoe::moe: weights {tuple(weights.shape)} must have ids' shape {tuple(ids.shape)}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"dsmoe::moe: weights must be in x's dtype {x.dtype}, got {w13.dtype}, {w2.dtype}")
    x, w13, w2 = (_aligned16(t.contiguous()) for t in (x, w13, w2))  # cp.async moves 16 bytes
    ids = ids.to(torch.int32).contiguous()
    rw = weights.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    if plan.T == 0:
        return y
    if plan.H == 0 or plan.I == 0:
        return y.zero_()
    # 2. carve the workspace
    layout = plan.workspace()
    ws = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=x.device)
    buf = {n: ws[o:o + n_el * dt.itemsize].view(dt) for n, (o, n_el, dt) in layout.items() if n != "_total"}
    mod = build.load("moe", x.device)
    tag, BM = DTYPE_TAGS[x.dtype], plan.BM
    threads = TILES[plan.path][2]
    # 3. align: counts, padded offsets, block -> expert, sorted (token, slot) pairs
    mod.launch("moe_align", (1,), (ALIGN_THREADS,), ALIGN_SIG,
               (ids, plan.P, plan.E, BM, plan.max_blocks, buf["offsets"], buf["block_expert"], buf["sorted_pair"]),
               smem=(2 * plan.E + 1) * 4)
    prefix = "moe_simt_" if plan.path == "simt" else "moe_"
    cfg = "" if plan.path == "simt" else f"_{plan.path}"
    # 4. gate/up GEMM with SwiGLU in the epilogue -> act
    mod.launch(f"{prefix}gemm1_{tag}{cfg}", plan.gemm1_grid, (threads,), GEMM_SIG,
               (x, w13, buf["sorted_pair"], buf["block_expert"], rw, buf["act"], None, plan.K, plan.H, plan.I))
    # 5. down GEMM · routing weight -> per-pair fp32 rows (reduce) or y32 / y (atomic)
    if plan.combine == "reduce":
        out = buf["out"]
    else:
        out = buf.get("y32", y)
        out.zero_()
    mod.launch(f"{prefix}gemm2_{tag}{cfg}_{plan.combine}", plan.gemm2_grid, (threads,), GEMM_SIG,
               (buf["act"], w2, buf["sorted_pair"], buf["block_expert"], rw, None, out, plan.K, plan.H, plan.I))
    # 6. combine over K in fp32 (reduce) or cast y32 -> y (atomic, 16-bit dtypes)
    n = plan.T * plan.H
    grid = (min(-(-n // 256), 65535 * 4),)
    if plan.combine == "reduce":
        mod.launch(f"moe_combine_{tag}", grid, (256,), COMBINE_SIG, (out, ids, y, plan.T, plan.K, plan.H, plan.E))
    elif out is not y:
        mod.launch(f"moe_cast_{tag}", grid, (256,), CAST_SIG, (out, y, n))
    return y


def _aligned16(t: Tensor) -> Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()
