"""``dsmoe plan``: memory, all-to-all traffic and step time of an expert-parallel deployment (light imports)."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--gpus", required=True, type=int, help="GPUs in the expert-parallel group (N)")
@click.option("--gpu", default="h200", show_default=True, help="h100 | h200 | h800")
@click.option("--nodes", default=1, show_default=True, type=int, help="machines the GPUs are spread over (M)")
@click.option("--interconnect", default="ib-400g", show_default=True,
              help="network between nodes: ib-400g | ib-200g | roce-100g (NVLink inside a node)")
@click.option("--weights", default=None, help="bytes per weight: fp8 | bf16 | fp16 | fp32 | int8 | int4 [default: checkpoint's]")
@click.option("--kv-dtype", default="bf16", show_default=True, help="KV cache element type")
@click.option("--dispatch-dtype", default="bf16", show_default=True, help="dispatched activations: bf16 | fp8 | fp32")
@click.option("--combine-dtype", default="bf16", show_default=True, help="combined expert outputs: bf16 | fp32")
@click.option("--batch", default=128, show_default=True, type=int, help="sequences decoded per GPU")
@click.option("--context", default=4096, show_default=True, type=int, help="tokens of KV cache per sequence")
@click.option("--chunk", default=4096, show_default=True, type=int, help="prefill tokens per GPU per chunk")
@click.option("--redundant-experts", default=0, show_default=True, type=int, help="replicas per layer (EPLB)")
@click.option("--placement", default=None, metavar="FILE",
              help="`dsmoe experts --place N --json`: its busiest device's share sets the imbalance penalty")
@click.option("--usable", default=0.9, show_default=True, type=float, help="fraction of GPU memory for weights + KV")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan(source, gpus, gpu, nodes, interconnect, weights, kv_dtype, dispatch_dtype, combine_dtype, batch, context, chunk,
         redundant_experts, placement, usable, as_json):
    """Plan expert parallelism of SOURCE (a checkpoint directory, its config.json, or preset:NAME) over N GPUs."""
    from dsmoe.app.plan_run import render, run_plan
    doc = run_plan(source=source, gpus=gpus, gpu=gpu, nodes=nodes, interconnect=interconnect, weights=weights,
                   kv_dtype=kv_dtype, dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype, batch=batch,
                   context=context, chunk=chunk, redundant=redundant_experts, placement=placement, usable=usable)
    click.echo(json.dumps(doc, indent=2) if as_json else render(doc))
