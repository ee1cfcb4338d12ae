"""``dsmoe plan``: what an expert-parallel deployment of a model needs, for hardware this machine lacks.

For ``N`` GPUs over ``M`` nodes (``g = N/M`` per node, NVLink inside a node, ``--interconnect``
between nodes), data-parallel attention (every GPU decodes its own ``batch`` sequences) and the
routed experts spread over all N (plus ``R`` redundant replicas per layer):

- memory per GPU: non-expert weights (replicated) + ``ceil((E+R)/N)`` experts per MoE layer, at
  the weights' bytes per parameter; KV cache ``batch × context × bytes/token`` (MLA: the latent
  ``kv_lora_rank + qk_rope_head_dim`` per layer; else keys and values per head); a fit needs the
  total within ``usable`` (default 90%) of the GPU's memory;
- all-to-all bytes per token per MoE layer (:mod:`dsmoe.app.plan_model`): what dsmoe's dispatch
  and combine move, of which ``(g−1)/N`` crosses NVLink and ``(N−g)/N`` the network;
- per decode step (``batch`` tokens per GPU) and per prefill chunk (``chunk`` tokens per GPU):
  the communication time (NVLink and network in parallel, nominal link rates) against the expert
  compute (``max(FLOPs / peak, weight bytes read / HBM bandwidth)``), and, for decode, a roofline
  step time (every weight on the GPU and the batch's KV cache read once from HBM, plus the
  communication, not overlapped) → an upper bound on output tokens/s per GPU;
- the imbalance penalty of a placement: the busiest GPU's share × N multiplies expert compute and
  the traffic it receives (1 = perfect balance, assumed without ``--placement``).

All rates are nominal datasheet figures (:data:`dsmoe.app.plan_model.GPUS`); measured all-to-all
bandwidth is lower (the docs compare with DeepEP's published measurements).
"""

from __future__ import annotations

import math

from dsmoe.app.plan_model import GPUS, INTERCONNECTS, a2a_bytes_per_token, a2a_seconds
from dsmoe.errors import DsmoeError

DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0,
               "fp8": 1.0 + 4 / (128 * 128), "int8": 1.0, "int4": 0.5 + 2 / 32}  # fp8: 128×128 fp32 block scales
# activations on the wire: fp8 with one fp32 scale per 128 channels (DeepEP's FP8 dispatch layout)
ACT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0 + 4 / 128}


def counts(config) -> dict:
    """Parameter counts: the routed experts' and the rest (MTP layers excluded)."""
    from dsmoe.architecture import architecture
    a = architecture(config)
    experts = len(a.moe_layers) * a.routed_experts * a.params_per_expert
    return {"total": a.params_total, "expert": experts, "non_expert": a.params_total - experts,
            "per_expert": a.params_per_expert, "moe_layers": len(a.moe_layers)}


def kv_bytes_per_token(config, kv_bytes: float) -> float:
    L = config.num_hidden_layers
    if config.is_mla:
        return L * (config.kv_lora_rank + config.qk_rope_head_dim) * kv_bytes
    head = config.hidden_size // config.num_attention_heads
    return L * 2 * config.num_key_value_heads * head * kv_bytes


def plan(config, *, gpus: int, gpu: str = "h200", nodes: int = 1, interconnect: str = "ib-400g",
         weights: str | None = None, kv_dtype: str = "bf16", dispatch_dtype: str = "bf16", combine_dtype: str = "bf16",
         batch: int = 128, context: int = 4096, chunk: int = 4096, redundant: int = 0, busiest_share: float | None = None,
         usable: float = 0.9) -> dict:
    """One deployment's numbers (see the module docstring); every input is checked."""
    g = _check(config, gpus, gpu, nodes, interconnect, batch, context, chunk, redundant, usable)
    hw = GPUS[gpu]
    wb = _bytes(weights or _default_weights(config), "--weights")
    kvb = _bytes(kv_dtype, "--kv-dtype")
    db, cb = (_bytes(d, f, ACT_BYTES) for d, f in ((dispatch_dtype, "--dispatch-dtype"), (combine_dtype, "--combine-dtype")))
    c = counts(config)
    E, K, H, I = config.n_routed_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
    L = c["moe_layers"]
    local = math.ceil((E + redundant) / gpus)
    w_gpu = (c["non_expert"] + L * local * c["per_expert"]) * wb
    kv_tok = kv_bytes_per_token(config, kvb)
    kv_gpu = batch * context * kv_tok
    cap = hw.memory_gb * 1e9 * usable
    dispatch, combine = a2a_bytes_per_token(H, K, db, cb)
    imbalance = busiest_share * gpus if busiest_share else 1.0

    def phase(tokens: int) -> dict:
        per_layer = tokens * (dispatch + combine)
        nvl_b, net_b = per_layer * (g - 1) / gpus, per_layer * (gpus - g) / gpus
        net_bw = INTERCONNECTS[interconnect] if nodes > 1 else None
        t_comm = a2a_seconds(per_layer * imbalance, gpus, g, hw.nvlink_gbps, net_bw)
        slots = tokens * K * imbalance  # (token, expert) pairs this GPU computes
        flops = slots * 6 * I * H
        hit = min(local, slots)  # experts that receive a token (at most one read each)
        peak = (hw.fp8_tflops if wb < 2 else hw.bf16_tflops) * 1e12
        t_exp = max(flops / peak, hit * c["per_expert"] * wb / (hw.hbm_gbps * 1e9))
        return {"tokens_per_gpu": tokens, "a2a_bytes_per_layer": per_layer, "nvlink_bytes_per_layer": nvl_b,
                "network_bytes_per_layer": net_b, "comm_ms": L * t_comm * 1e3, "expert_ms": L * t_exp * 1e3}

    decode, prefill = phase(batch), phase(chunk)
    hbm_ms = (w_gpu + kv_gpu) / (hw.hbm_gbps * 1e9) * 1e3
    step_ms = max(hbm_ms, decode["expert_ms"]) + decode["comm_ms"]
    return {
        "model": {"params_total": c["total"], "expert_params": c["expert"], "non_expert_params": c["non_expert"],
                  "moe_layers": L, "experts": E, "top_k": K, "hidden": H, "mla": config.is_mla},
        "hardware": {"gpu": hw.name, "gpus": gpus, "nodes": nodes, "gpus_per_node": g, "interconnect": interconnect,
                     "memory_gb": hw.memory_gb, "usable": usable},
        "memory_gib": {"weights": w_gpu / 2**30, "kv_cache": kv_gpu / 2**30, "total": (w_gpu + kv_gpu) / 2**30,
                       "capacity": cap / 2**30},
        "fits": w_gpu + kv_gpu <= cap,
        "experts_per_gpu": local,
        "kv_bytes_per_token": kv_tok,
        "a2a_bytes_per_token_per_layer": {"dispatch": dispatch, "combine": combine},
        "decode": {**decode, "roofline_step_ms": step_ms, "tokens_per_s_per_gpu_bound": batch / step_ms * 1e3},
        "prefill_chunk": prefill,
        "imbalance": imbalance,
        "smallest_ep_that_fits": smallest_fit(config, c, wb, kv_gpu, cap, redundant),
        "assumptions": {"weights": weights or _default_weights(config), "kv_dtype": kv_dtype,
                        "dispatch_dtype": dispatch_dtype, "combine_dtype": combine_dtype, "batch_per_gpu": batch,
                        "context": context, "prefill_chunk_per_gpu": chunk, "redundant_experts": redundant},
    }


def smallest_fit(config, c: dict, wb: float, kv_gpu: float, cap: float, redundant: int) -> int | None:
    E = config.n_routed_experts
    for n in range(1, E + 1):
        if (c["non_expert"] + c["moe_layers"] * math.ceil((E + redundant) / n) * c["per_expert"]) * wb + kv_gpu <= cap:
            return n
    return None


def _default_weights(config) -> str:
    return "fp8" if getattr(config, "fp8_block", None) else str(config.torch_dtype)


def _bytes(name: str, flag: str, table: dict = DTYPE_BYTES) -> float:
    if name not in table:
        raise DsmoeError(f"{flag} {name!r}: expected one of {', '.join(sorted(table))}")
    return table[name]


def _check(config, gpus, gpu, nodes, interconnect, batch, context, chunk, redundant, usable) -> int:
    if not config.moe_layers:
        raise DsmoeError("dsmoe plan needs a model with routed experts")
    if gpu not in GPUS:
        raise DsmoeError(f"--gpu {gpu!r}: known GPUs are {', '.join(GPUS)}")
    if interconnect not in INTERCONNECTS:
        raise DsmoeError(f"--interconnect {interconnect!r}: expected one of {', '.join(INTERCONNECTS)}")
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise DsmoeError(f"--gpus {gpus} must be a positive multiple of --nodes {nodes}")
    if nodes > 1 and interconnect == "nvlink":
        raise DsmoeError("--interconnect nvlink is inside one node: give the network between nodes (e.g. ib-400g)")
    if gpus > config.n_routed_experts + redundant:
        raise DsmoeError(f"--gpus {gpus}: more GPUs than expert copies ({config.n_routed_experts} + {redundant} redundant)")
    for name, v in (("--batch", batch), ("--context", context), ("--chunk", chunk)):
        if v < 1:
            raise DsmoeError(f"{name} must be at least 1, got {v}")
    if redundant < 0 or not 0 < usable <= 1:
        raise DsmoeError("--redundant-experts must be >= 0 and --usable in (0, 1]")
    return gpus // nodes
