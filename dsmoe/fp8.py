"""fp8 checkpoints (DeepSeek-V3's published weights): e4m3 weights with block scales, dequantized on load.

Each quantized linear stores ``X.weight`` as ``float8_e4m3fn [N, K]`` and ``X.weight_scale_inv``
as fp32 ``[ceil(N/bn), ceil(K/bk)]`` for the config's ``quantization_config.weight_block_size``
``[bn, bk]`` (128×128); the weight is ``w[i, j] = float(q[i, j]) · s[i // bn, j // bk]``, computed in
fp32 and cast once to the requested dtype (DeepSeek's ``weight_dequant``; the last blocks of a
dimension that is not a multiple of the block are partial). Norms, the router, embeddings and
``lm_head`` stay unquantized. dsmoe then runs the dequantized weights: activations are not
quantized (the published model computes its GEMMs in fp8 with dynamic activation scales).
"""

from __future__ import annotations

import math

import torch

from dsmoe.contract import FP8_SCALE_SUFFIX
from dsmoe.errors import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn,)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def is_scale_key(key: str) -> bool:
    return key.endswith(f".weight{FP8_SCALE_SUFFIX}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``q [N,K]`` fp8 and ``scale [ceil(N/bn), ceil(K/bk)]`` → fp32 ``[N,K]``."""
    bn, bk = block
    N, K = q.shape
    s = scale.float().repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]
    return q.float() * s


def dequantize_state_dict(sd: dict[str, torch.Tensor], block: tuple[int, int] | None,
                          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace every fp8 ``X.weight`` and its ``X.weight_scale_inv`` by the dequantized ``X.weight``
    in ``dtype``; a quantized weight without its scale (or the reverse), a scale of the wrong
    shape, or fp8 weights without ``quantization_config`` are errors."""
    scales = {k for k in sd if is_scale_key(k)}
    fp8 = {k for k, t in sd.items() if is_fp8(t)}
    if not scales and not fp8:
        return sd
    if block is None:
        raise CheckpointError(f"{sorted(fp8 | scales)[0]} is an fp8 weight or scale, but config.json has no "
                              "quantization_config (weight_block_size)")
    out = {k: t for k, t in sd.items() if k not in scales and k not in fp8}
    for key in sorted(fp8):
        skey = key + FP8_SCALE_SUFFIX
        if skey not in scales:
            raise CheckpointError(f"fp8 tensor {key} has no {skey}")
        q, s = sd[key], sd[skey]
        want = tuple(math.ceil(n / b) for n, b in zip(q.shape, block))
        if q.dim() != 2 or tuple(s.shape) != want:
            raise CheckpointError(f"wrong shape for {skey}: expected {list(want)} for {key} {list(q.shape)} in "
                                  f"{block[0]}×{block[1]} blocks, found {list(s.shape)}")
        out[key] = dequantize(q, s, block).to(dtype)
    orphans = sorted(k for k in scales if k.removesuffix(FP8_SCALE_SUFFIX) not in fp8)
    if orphans:
        raise CheckpointError(f"{orphans[0]} scales {orphans[0].removesuffix(FP8_SCALE_SUFFIX)}, which is not an fp8 tensor")
    return out
