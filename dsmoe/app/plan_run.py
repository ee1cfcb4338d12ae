"""The body of ``dsmoe plan``: read the config (and a placement), compute :func:`dsmoe.app.plan.plan`, render it."""

from __future__ import annotations

from pathlib import Path

from dsmoe.errors import DsmoeError


def load_plan_config(source: str):
    """``preset:NAME``, a checkpoint directory, or a ``config.json`` file (no weights are read)."""
    import dsmoe
    from dsmoe.config import DeepseekConfig
    p = Path(source)
    if not dsmoe.is_preset(source) and p.is_file():
        if p.suffix != ".json":
            raise DsmoeError(f"{source}: expected a config.json, a checkpoint directory or preset:NAME")
        return DeepseekConfig.from_json(p)
    return dsmoe.load_config(source)


def run_plan(*, source: str, gpus: int, placement: str | None = None, redundant: int = 0, **kw) -> dict:
    from dsmoe.app.ep_placement import add_redundant, read_placement
    from dsmoe.app.plan import plan
    config = load_plan_config(source)
    share = None
    if placement:
        p = add_redundant(read_placement(placement, config.moe_layers, config.n_routed_experts, gpus), redundant)
        share = p.busiest_share()
        if share is None:
            raise DsmoeError(f"{placement} has no measured loads (\"layers\" with \"counts\"): nothing to weigh it by")
    doc = plan(config, gpus=gpus, redundant=redundant, busiest_share=share, **kw)
    doc["source"] = source
    return doc


def render(d: dict) -> str:
    hw, m, mem = d["hardware"], d["model"], d["memory_gib"]
    dec, pre, a2a = d["decode"], d["prefill_chunk"], d["a2a_bytes_per_token_per_layer"]
    a = d["assumptions"]
    lines = [
        f"{d['source']}: {m['params_total'] / 1e9:.1f}B parameters ({m['expert_params'] / 1e9:.1f}B in {m['experts']} routed "
        f"experts × {m['moe_layers']} MoE layers, top-{m['top_k']}), weights {a['weights']}",
        f"on {hw['gpus']} × {hw['gpu']} ({hw['nodes']} node(s) of {hw['gpus_per_node']}, {hw['interconnect']} between nodes)",
        f"  memory per GPU     {mem['total']:.1f} GiB = weights {mem['weights']:.1f} + KV {mem['kv_cache']:.1f} "
        f"({a['batch_per_gpu']} seq × {a['context']} tokens × {d['kv_bytes_per_token'] / 1024:.1f} KiB"
        f"{', MLA latent' if m['mla'] else ''}) of {mem['capacity']:.1f} usable: {'fits' if d['fits'] else 'DOES NOT FIT'}",
        f"  experts per GPU    {d['experts_per_gpu']} per MoE layer; smallest EP degree that fits: "
        f"{d['smallest_ep_that_fits'] or 'none'}",
        f"  all-to-all         {a2a['dispatch'] / 1024:.1f} KiB dispatch + {a2a['combine'] / 1024:.1f} KiB combine per token "
        f"per MoE layer ({a['dispatch_dtype']}/{a['combine_dtype']})",
        f"  decode step        {dec['tokens_per_gpu']} tokens/GPU: comm {dec['comm_ms']:.2f} ms vs experts "
        f"{dec['expert_ms']:.2f} ms; roofline step {dec['roofline_step_ms']:.2f} ms → ≤ "
        f"{dec['tokens_per_s_per_gpu_bound']:,.0f} tokens/s/GPU",
        f"  prefill chunk      {pre['tokens_per_gpu']} tokens/GPU: comm {pre['comm_ms']:.2f} ms vs experts "
        f"{pre['expert_ms']:.2f} ms",
        f"  imbalance penalty  ×{d['imbalance']:.2f} (busiest GPU's share × N; 1 = perfectly balanced)",
    ]
    return "\n".join(lines)
