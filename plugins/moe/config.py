"""Launch configuration of ``dsmoe::moe``: shape validation and :func:`moe_config`, the one function
that picks the path, tiles, warps and stages for the PyTorch launcher and the AOT build.

Paths: ``small`` (T·K ≤ 16·E: about one 16-row block per hit expert, so every weight byte is
read once, and narrow N tiles give ≥ 2 CTAs per SM at the DeepSeek shapes: bandwidth-bound) and
``large`` (64-row blocks for the tensor cores: wgmma on sm_90, mma.sync on sm_80). fp32 takes
the same paths with smaller tiles and ``input_precision="ieee"`` (no tensor cores).
Shape letters: T tokens, H hidden, E experts, K per token, I expert width; P = T·K pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsmoe.plugins._triton import TYPE_OF_DTYPE, Buffer, Launch

MAX_E = 512                # the offsets kernel holds all experts in one program
SMALL_PAIRS_PER_EXPERT = 16
ALIGN_BLOCK = 1024         # pairs per program of the count and scatter kernels
OFFSETS_BLOCK_B = 64       # row blocks per step of the offsets kernel
COMBINE_TILE = (8, 256)    # (tokens, H columns) per program of the combine kernel
# (BLOCK_M, gate_up (BLOCK_N, BLOCK_K), down (BLOCK_N, BLOCK_K), num_warps) per (path, 16-bit?)
TILES = {
    ("small", True): (16, (32, 128), (32, 128), 4),
    ("large", True): (64, (64, 64), (128, 64), 4),
    ("small", False): (16, (32, 64), (32, 64), 4),
    ("large", False): (64, (32, 32), (64, 32), 4),
}
STAGES = {("small", True): {80: 3, 90: 4}, ("large", True): {80: 3, 90: 3},
          ("small", False): {80: 2, 90: 2}, ("large", False): {80: 2, 90: 2}}
MB = "(T*K + min(E, T*K)*({bm} - 1)) // {bm}"  # row blocks: bounds Σ_e ceil(count_e / BLOCK_M), no sync

COUNT_ARGS = (("ids", "*i32"), ("counts", "*i32"), ("rank", "*i32"), ("P", "i32"), ("E", "i32"))
OFFSETS_ARGS = (("counts", "*i32"), ("start", "*i32"), ("block_expert", "*i32"), ("E", "i32"), ("MB", "i32"))
SCATTER_ARGS = (("ids", "*i32"), ("rank", "*i32"), ("start", "*i32"), ("sorted_pair", "*i32"), ("P", "i32"),
                ("E", "i32"))
ROWS_ARGS = (("block_expert", "*i32"), ("start", "*i32"), ("counts", "*i32"), ("sorted_pair", "*i32"))
GATE_UP_ARGS = (("x", "*{x}"), ("w13", "*{x}"), *ROWS_ARGS, ("act", "*{x}"), ("H", "i32"), ("I", "i32"),
                ("K", "i32"))
DOWN_ARGS = (("act", "*{x}"), ("w2", "*{x}"), *ROWS_ARGS, ("weights", "*fp32"), ("out", "*fp32"), ("H", "i32"),
             ("I", "i32"))
COMBINE_ARGS = (("out", "*fp32"), ("ids", "*i32"), ("y", "*{x}"), ("T", "i32"), ("H", "i32"), ("K", "i32"),
                ("E", "i32"))


@dataclass(frozen=True)
class MoEConfig:
    path: str
    BLOCK_M: int
    count: Launch
    offsets: Launch
    scatter: Launch
    gate_up: Launch
    down: Launch
    combine: Launch

    @property
    def launches(self) -> tuple[Launch, ...]:
        """In launch order (after zeroing ``counts``)."""
        return (self.count, self.offsets, self.scatter, self.gate_up, self.down, self.combine)

    @property
    def mb(self) -> str:
        return MB.format(bm=self.BLOCK_M)

    @property
    def buffers(self) -> tuple[Buffer, ...]:
        mb = self.mb
        return (Buffer("counts", "i32", "E", zeroed=True), Buffer("rank", "i32", "T*K"),
                Buffer("start", "i32", "E + 1"), Buffer("block_expert", "i32", mb),
                Buffer("sorted_pair", "i32", f"({mb}) * {self.BLOCK_M}"),
                Buffer("act", "{x}", f"({mb}) * {self.BLOCK_M} * I"), Buffer("out", "fp32", "T*K*H"))


def moe_config(T: int, E: int, K: int, H: int, I: int, dtype: torch.dtype, arch: int) -> MoEConfig:
    """The launch configuration for T tokens, E experts, K per token, hidden H, expert width I."""
    del H, I  # the tiles do not depend on them; kept in the signature shared by every op
    if dtype not in TYPE_OF_DTYPE:
        raise ValueError(f"dsmoe::moe: unsupported dtype {dtype} (supported: float32, bfloat16, float16)")
    path = "small" if T * K <= SMALL_PAIRS_PER_EXPERT * E else "large"
    half = dtype != torch.float32
    bm, (n1, k1), (n2, k2), warps = TILES[(path, half)]
    stages = STAGES[(path, half)].get(arch, 2)
    e_pad = 64 if E <= 64 else MAX_E
    mb = MB.format(bm=bm)
    align = (f"cdiv(T*K, {ALIGN_BLOCK})", "1", "1")
    bt, bh = COMBINE_TILE
    return MoEConfig(
        path, bm,
        count=Launch("moe_count_kernel", COUNT_ARGS, (("BLOCK", ALIGN_BLOCK),), 4, 1, align),
        offsets=Launch("moe_offsets_kernel", OFFSETS_ARGS,
                       (("BLOCK_M", bm), ("E_PAD", e_pad), ("BLOCK_B", OFFSETS_BLOCK_B)), 4, 1, ("1", "1", "1")),
        scatter=Launch("moe_scatter_kernel", SCATTER_ARGS, (("BLOCK", ALIGN_BLOCK),), 4, 1, align),
        gate_up=Launch("moe_gate_up_kernel", GATE_UP_ARGS, (("BLOCK_M", bm), ("BLOCK_N", n1), ("BLOCK_K", k1)),
                       warps, stages, (mb, f"cdiv(I, {n1})", "1")),
        down=Launch("moe_down_kernel", DOWN_ARGS, (("BLOCK_M", bm), ("BLOCK_N", n2), ("BLOCK_K", k2)),
                    warps, stages, (mb, f"cdiv(H, {n2})", "1")),
        combine=Launch("moe_combine_kernel", COMBINE_ARGS, (("BLOCK_T", bt), ("BLOCK_H", bh)), 4, 1,
                       (f"cdiv(T, {bt})", f"cdiv(H, {bh})", "1")),
    )


def moe_rule(cfg: MoEConfig) -> str:
    """The condition on the runtime sizes under which :func:`moe_config` returns ``cfg`` for its
    dtype class (for the AOT manifest)."""
    e_pad = dict(cfg.offsets.constexprs)["E_PAD"]
    small = f"T*K <= {SMALL_PAIRS_PER_EXPERT}*E"
    return f"{small if cfg.path == 'small' else 'not ' + small} and " + ("E <= 64" if e_pad == 64 else "E > 64")


def all_moe_configs(arch: int) -> list[tuple[MoEConfig, tuple[torch.dtype, ...]]]:
    """Every configuration :func:`moe_config` can return for ``arch``, with the dtypes it serves."""
    out = []
    for dtypes in ((torch.bfloat16, torch.float16), (torch.float32,)):
        for T in (1, 10 ** 6):
            for E in (64, MAX_E):
                out.append((moe_config(T, E, 1, 1, 1, dtypes[0], arch), dtypes))
    return out


def validate_moe(x_shape, weights_shape, ids_shape, w13_shape, w2_shape, dtype: torch.dtype,
                 activation: str) -> tuple[int, int, int, int, int]:
    """Check shapes and attributes; return (T, H, E, K, I) or raise ValueError."""
    if activation != "silu":
        raise ValueError(f"dsmoe::moe: unsupported activation {activation!r} (supported: silu)")
    if dtype not in TYPE_OF_DTYPE:
        raise ValueError(f"dsmoe::moe: unsupported dtype {dtype} (supported: float32, bfloat16, float16)")
    if len(x_shape) != 2 or len(ids_shape) != 2 or len(w13_shape) != 3 or len(w2_shape) != 3:
        raise ValueError("dsmoe::moe: want x [T,H], ids [T,K], w13 [E,2I,H], w2 [E,H,I]")
    T, H = x_shape
    K = ids_shape[1]
    E, two_i, h13 = w13_shape
    I = two_i // 2
    if ids_shape[0] != T or h13 != H or two_i % 2 or tuple(w2_shape) != (E, H, I) or K < 1 or E < 1:
        raise ValueError(f"dsmoe::moe: inconsistent shapes x {tuple(x_shape)}, ids {tuple(ids_shape)}, "
                         f"w13 {tuple(w13_shape)}, w2 {tuple(w2_shape)}")
    if tuple(weights_shape) != tuple(ids_shape):
        raise ValueError(f"dsmoe::moe: weights {tuple(weights_shape)} must have ids' shape {tuple(ids_shape)}")
    if E > MAX_E:
        raise ValueError(f"dsmoe::moe: at most {MAX_E} experts, got E={E}")
    return T, H, E, K, I
