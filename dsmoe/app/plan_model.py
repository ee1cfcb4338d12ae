"""The formulas of ``dsmoe plan``: memory per GPU, all-to-all bytes, time per step (no torch at import).

Bytes of expert-parallel traffic per token per MoE layer, as :mod:`dsmoe.distributed` moves them
(one row per (token, slot): a token sends one copy per chosen expert, no per-rank de-duplication):

- dispatch: ``K · (H·b_act + 8)`` (the hidden row, plus its fp32 weight and local expert id)
- combine:  ``K · H·b_out`` (the weighted expert output)
- of which ``(N−1)/N`` crosses the wire under uniform routing (the rest stays on the rank), and
  ``N·8`` bytes of split sizes per rank per layer.

Replicated attention instead all-reduces ``T·H·4`` bytes (fp32) per layer; a ring all-reduce
moves ``2(N−1)/N`` of that per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

META_BYTES = 8  # fp32 routing weight + local expert id (as fp32) per dispatched row
COUNT_BYTES = 8  # int64 split size per destination rank


def a2a_bytes_per_token(H: int, K: int, act_bytes: int, out_bytes: int | None = None) -> tuple[int, int]:
    """``(dispatch, combine)`` bytes one token hands to the all-to-alls in one MoE layer."""
    return K * (H * act_bytes + META_BYTES), K * H * (act_bytes if out_bytes is None else out_bytes)


def a2a_step_bytes(tokens: int, H: int, K: int, act_bytes: int, world: int) -> int:
    """All bytes one rank hands to the collectives for ``tokens`` of its own in one MoE layer
    (dispatch + combine + split sizes), the local share included."""
    d, c = a2a_bytes_per_token(H, K, act_bytes)
    return tokens * (d + c) + world * COUNT_BYTES


def allreduce_step_bytes(tokens: int, H: int) -> int:
    """What one rank hands to the all-reduce (fp32 ``[T,H]``) in one MoE layer."""
    return tokens * H * 4


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float      # HBM capacity, GB (1e9 bytes, as the datasheet counts)
    hbm_gbps: float       # HBM bandwidth, GB/s
    bf16_tflops: float    # dense BF16 tensor-core peak
    fp8_tflops: float     # dense FP8 peak
    nvlink_gbps: float    # NVLink bandwidth per GPU per direction, GB/s


# NVIDIA's datasheet figures (H100 SXM5, H200 SXM; dense, no sparsity). NVLink 4: 900 GB/s
# bidirectional per GPU = 450 GB/s each way. H800: NVLink cut to 400 GB/s bidirectional.
GPUS = {
    "h100": Gpu("H100 SXM 80GB", 80, 3350, 989, 1979, 450),
    "h800": Gpu("H800 SXM 80GB", 80, 3350, 989, 1979, 200),
    "h200": Gpu("H200 SXM 141GB", 141, 4800, 989, 1979, 450),
}
# Network between nodes, per GPU per direction, GB/s: one 400 Gb/s NIC per GPU = 50 GB/s.
INTERCONNECTS = {"nvlink": None, "ib-400g": 50.0, "ib-200g": 25.0, "roce-100g": 12.5}


def a2a_seconds(bytes_per_gpu: float, gpus: int, per_node: int, nvlink_gbps: float, net_gbps: float | None) -> float:
    """Time of one all-to-all that hands ``bytes_per_gpu`` to the collective on every GPU, destinations
    uniform: ``(g−1)/N`` of it over NVLink and ``(N−g)/N`` over the network, both links at once."""
    t_nvl = bytes_per_gpu * (per_node - 1) / gpus / (nvlink_gbps * 1e9) if per_node > 1 else 0.0
    t_net = bytes_per_gpu * (gpus - per_node) / gpus / (net_gbps * 1e9) if net_gbps and gpus > per_node else 0.0
    return max(t_nvl, t_net)
