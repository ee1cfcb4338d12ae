"""Triton kernels of ``dsmoe::moe`` (import through ``dsmoe.plugins._triton.kernels("moe")``).

The P = T·K (token, slot) pairs are grouped by expert into row blocks of BLOCK_M rows, each
expert's rows padded to a whole number of blocks:

1. ``moe_count_kernel``: ``rank[p]`` = atomic ticket of pair p at its expert, ``counts[E]`` (zeroed first)
2. ``moe_offsets_kernel`` (one program): ``start[e]`` = padded exclusive prefix of the counts,
   ``start[E]`` = padded rows in all; ``block_expert[b]`` = expert of row block b (-1 past the end)
3. ``moe_scatter_kernel``: ``sorted_pair[start[e] + rank[p]] = p`` (padding rows are never read)
4. ``moe_gate_up_kernel``: per (row block, I tile) ``act = silu(x·w13[e][:I]ᵀ) ⊙ (x·w13[e][I:]ᵀ)``
5. ``moe_down_kernel``: per (row block, H tile) ``out[p] = weights[p] · act·w2[e]ᵀ`` (fp32 rows)
6. ``moe_combine_kernel``: ``y[t] = Σ_k out[t·K + k]`` in fp32, cast to y's dtype

Only the rows of a block that belong to its expert (``row - start[e] < counts[e]``) are loaded or
stored, so padding needs no initialisation. Shape letters: T tokens, H hidden, E experts,
K per token, I expert width. Kept within the Triton 3.6 language.
"""

import triton
import triton.language as tl


@triton.jit
def moe_count_kernel(ids_ptr, counts_ptr, rank_ptr, P, E, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + p, mask=p < P, other=-1)
    ok = (p < P) & (e >= 0) & (e < E)  # ids outside [0, E) contribute nothing
    ticket = tl.atomic_add(counts_ptr + e, 1, mask=ok)
    tl.store(rank_ptr + p, ticket, mask=ok)


@triton.jit
def moe_offsets_kernel(counts_ptr, start_ptr, block_expert_ptr, E, MB, BLOCK_M: tl.constexpr,
                       E_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    e = tl.arange(0, E_PAD)
    c = tl.load(counts_ptr + e, mask=e < E, other=0)
    padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(start_ptr + e, end - padded, mask=e < E)
    tl.store(start_ptr + E, total)
    for b0 in range(0, MB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        row = b * BLOCK_M
        # the expert holding `row` is the first whose end lies beyond it
        before = (end[None, :] <= row[:, None]) & (e < E)[None, :]
        owner = tl.sum(before.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(row < total, owner, -1), mask=b < MB)


@triton.jit
def moe_scatter_kernel(ids_ptr, rank_ptr, start_ptr, sorted_pair_ptr, P, E, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + p, mask=p < P, other=-1)
    ok = (p < P) & (e >= 0) & (e < E)
    r = tl.load(rank_ptr + p, mask=ok, other=0)
    s = tl.load(start_ptr + e, mask=ok, other=0)
    tl.store(sorted_pair_ptr + s + r, p, mask=ok)


@triton.jit
def _block_rows(block_expert_ptr, start_ptr, counts_ptr, sorted_pair_ptr, BLOCK_M: tl.constexpr):
    """(expert, padded row ids, row valid, pair ids) of this program's row block."""
    e = tl.load(block_expert_ptr + tl.program_id(0))
    e_safe = tl.maximum(e, 0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    count = tl.where(e >= 0, tl.load(counts_ptr + e_safe), 0)
    valid = rows - tl.load(start_ptr + e_safe) < count
    pair = tl.load(sorted_pair_ptr + rows, mask=valid, other=0)
    return e, e_safe, rows, valid, pair


@triton.jit
def moe_gate_up_kernel(x_ptr, w13_ptr, block_expert_ptr, start_ptr, counts_ptr, sorted_pair_ptr, act_ptr,
                       H, I, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       F32_DOT: tl.constexpr):
    """act[row, n] = silu(gate)·up for the BLOCK_M rows of one expert and BLOCK_N of its I columns."""
    e, e_safe, rows, valid, pair = _block_rows(block_expert_ptr, start_ptr, counts_ptr, sorted_pair_ptr, BLOCK_M)
    if e < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = x_ptr + (pair // K).to(tl.int64)[:, None] * H
    # gate rows e·2I + n, up rows e·2I + I + n, as the columns of [BLOCK_K, BLOCK_N] tiles
    g_row = e_safe.to(tl.int64) * 2 * I + offs_n
    g_cols = w13_ptr + g_row[None, :] * H
    u_cols = w13_ptr + (g_row + I)[None, :] * H
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < H
        a = tl.load(a_rows + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(g_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        bu = tl.load(u_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if F32_DOT:
            a = a.to(tl.float32)
            acc_g = tl.dot(a, bg.to(tl.float32), acc_g, input_precision="ieee")
            acc_u = tl.dot(a, bu.to(tl.float32), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out = act_ptr + rows.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def moe_down_kernel(act_ptr, w2_ptr, block_expert_ptr, start_ptr, counts_ptr, sorted_pair_ptr, weights_ptr,
                    out_ptr, H, I, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    F32_DOT: tl.constexpr):
    """out[pair, n] = weights[pair] · Σ_i act[row, i]·w2[e, n, i] (fp32) for BLOCK_N of the H columns."""
    e, e_safe, rows, valid, pair = _block_rows(block_expert_ptr, start_ptr, counts_ptr, sorted_pair_ptr, BLOCK_M)
    if e < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + rows.to(tl.int64)[:, None] * I
    b_cols = w2_ptr + (e_safe.to(tl.int64) * H + offs_n)[None, :] * I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < I
        a = tl.load(a_rows + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if F32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    w = tl.load(weights_ptr + pair, mask=valid, other=0.0)
    out = out_ptr + pair.to(tl.int64)[:, None] * H + offs_n[None, :]
    tl.store(out, acc * w[:, None], mask=valid[:, None] & n_ok[None, :])


@triton.jit
def moe_combine_kernel(out_ptr, ids_ptr, y_ptr, T, H, K, E, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[t, h] = Σ_k out[t·K + k, h] over the slots with a valid expert id (fp32, then y's dtype)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    h_ok = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in range(K):
        pair = offs_t.to(tl.int64) * K + k
        e = tl.load(ids_ptr + pair, mask=t_ok, other=-1)
        ok = t_ok & (e >= 0) & (e < E)
        acc += tl.load(out_ptr + pair[:, None] * H + offs_h[None, :], mask=ok[:, None] & h_ok[None, :], other=0.0)
    y = y_ptr + offs_t.to(tl.int64)[:, None] * H + offs_h[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & h_ok[None, :])
