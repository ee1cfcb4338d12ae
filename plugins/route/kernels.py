"""Triton kernels of ``dsmoe::route`` (import through ``dsmoe.plugins._triton.kernels("route")``).

Two launches: ``route_logits_kernel`` (``logits [T,E] fp32 = x·W_gateᵀ``, a tiled GEMM over
(token block, expert block)) and ``route_select_kernel`` (scores, group limit, top-K, normalize,
scale; one program per BLOCK_T tokens holding all E_PAD experts of each). Shape letters: T tokens,
H hidden, E experts, K per token, G groups. Kept within the Triton 3.6 language.
"""

import triton
import triton.language as tl


@triton.jit
def route_logits_kernel(x_ptr, w_ptr, logits_ptr, T, H, E,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                        F32_DOT: tl.constexpr):
    """logits[t, e] = Σ_h x[t, h]·w[e, h] in fp32 (x [T,H], w [E,H] of one dtype)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_h = tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    e_ok = offs_e < E
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * H
    w_cols = w_ptr + offs_e.to(tl.int64)[None, :] * H  # W_gateᵀ tile [BLOCK_H, BLOCK_E]
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + offs_h
        h_ok = h < H
        a = tl.load(x_rows + h[None, :], mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        b = tl.load(w_cols + h[:, None], mask=h_ok[:, None] & e_ok[None, :], other=0.0)
        if F32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = logits_ptr + offs_t.to(tl.int64)[:, None] * E + offs_e[None, :]
    tl.store(out, acc, mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _first_argmax(v, idx, PAD: tl.constexpr):
    """(max over axis 1, lowest index attaining it) of v [BLOCK_T, N]; idx [N] are the column ids."""
    best = tl.max(v, axis=1)
    arg = tl.min(tl.where(v == best[:, None], idx[None, :], PAD), axis=1)
    return best, arg


@triton.jit
def route_select_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, K, n_group, topk_group,
                        scoring, method, normalize, scale, scaling,
                        BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                        G_PAD: tl.constexpr):
    """Route BLOCK_T tokens from their fp32 logits (codes as in ``config.py``).

    1. scores = softmax (scoring 0) or sigmoid (1); choice = scores + bias (zeros when absent)
    2. method 1/2 with n_group > 1: group score = max (1) or sum of the top-2 (2) of choice;
       keep the best topk_group groups, choice of the others = -inf
    3. ids = top-K of choice (descending, ties to the lower id); weights = scores at ids
    4. normalize: w /= Σw + 1e-20; scale: w *= scaling
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    t_ok = offs_t < T
    e_ok = cols < E
    ok = t_ok[:, None] & e_ok[None, :]
    logits = tl.load(logits_ptr + offs_t.to(tl.int64)[:, None] * E + cols[None, :], mask=ok,
                     other=float("-inf"))
    # 1. scores and the selection values
    if scoring == 0:
        m = tl.where(t_ok, tl.max(logits, axis=1), 0.0)  # padding rows: no -inf - -inf
        z = tl.where(ok, tl.exp(logits - m[:, None]), 0.0)
        scores = z / tl.maximum(tl.sum(z, axis=1), 1e-30)[:, None]
    else:
        scores = tl.where(ok, tl.sigmoid(logits), 0.0)
    bias = tl.load(bias_ptr + cols, mask=e_ok, other=0.0)
    choice = tl.where(ok, scores + bias[None, :], float("-inf"))
    # 2. group limit
    if method != 0 and n_group > 1:
        size = E // n_group
        gid = cols // size  # >= n_group for the padding columns
        gcols = tl.arange(0, G_PAD)
        gscore = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
        for g in range(n_group):
            cg = tl.where((gid == g)[None, :], choice, float("-inf"))
            top1, i1 = _first_argmax(cg, cols, E_PAD)
            if method == 2:
                top2 = tl.max(tl.where(cols[None, :] == i1[:, None], float("-inf"), cg), axis=1)
                top1 = top1 + top2
            gscore = tl.where((gcols == g)[None, :], top1[:, None], gscore)
        keep = tl.zeros((BLOCK_T, G_PAD), dtype=tl.int32)
        for _ in range(topk_group):
            _, gi = _first_argmax(gscore, gcols, G_PAD)
            hit = gcols[None, :] == gi[:, None]
            keep = tl.where(hit, 1, keep)
            gscore = tl.where(hit, float("-inf"), gscore)
        kept = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
        for g in range(n_group):
            kg = tl.max(tl.where((gcols == g)[None, :], keep, 0), axis=1)
            kept = tl.where((gid == g)[None, :], kg[:, None], kept)
        choice = tl.where(kept > 0, choice, float("-inf"))
    # 3. top-K
    kcols = tl.arange(0, K_PAD)
    w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for k in range(K):
        _, i = _first_argmax(choice, cols, E_PAD)
        at = cols[None, :] == i[:, None]
        wk = tl.sum(tl.where(at, scores, 0.0), axis=1)
        w = tl.where((kcols == k)[None, :], wk[:, None], w)
        ids = tl.where((kcols == k)[None, :], i[:, None], ids)
        choice = tl.where(at, float("-inf"), choice)
    # 4. normalize, scale
    if normalize != 0:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    if scale != 0:
        w = w * scaling
    out = offs_t.to(tl.int64)[:, None] * K + kcols[None, :]
    k_ok = t_ok[:, None] & (kcols < K)[None, :]
    tl.store(weights_ptr + out, w, mask=k_ok)
    tl.store(ids_ptr + out, ids, mask=k_ok)
