"""The ``dsmoe`` and ``dsmoe-export`` commands: thin click wrappers over library functions.

Errors a user can cause (:class:`dsmoe.errors.DsmoeError`) print one line on stderr and exit
with code 2 (verification failures: 1); ``--debug`` (on both entry points) shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from dsmoe.app.choices import GENERATE_BACKENDS, KERNELS, ROUTER_BACKENDS, SUITES
from dsmoe.app.ep import ep_kwargs, ep_options, run_generate_ep
from dsmoe.app.params import SEED
from dsmoe.errors import DsmoeError, DsmoeWarning
from dsmoe.outputs import check_output_file, write_failure, write_output_file

# Only click and light modules above: `dsmoe --help` and `dsmoe CMD --help` must not import torch or
# ONNX Runtime (a test bounds the import set). Each command imports what it runs inside its body.
BACKENDS = ROUTER_BACKENDS


class _LazyConsole:
    """A rich Console made on first use (rich costs a tenth of a second to import)."""

    def __init__(self, **kwargs):
        self._kwargs, self._console = kwargs, None

    def __getattr__(self, name):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return getattr(self._console, name)


HELP = {"help_option_names": ["-h", "--help"]}  # `-h` everywhere (subcommands inherit the group's)
out = _LazyConsole()
err = _LazyConsole(stderr=True)
_state = {"debug": False}  # set by --debug; read when an error reaches the entry point


@contextmanager
def stage(text: str):
    """A spinner on stderr while a long step runs."""
    with err.status(text, spinner="dots"):
        yield


def _overrides(items):
    from dsmoe.config import parse_overrides

    return parse_overrides(items)


def _set_debug(ctx, param, value):
    if value:
        _state["debug"] = True
    return value


nonfinite_option = click.option("--allow-nonfinite", is_flag=True,
                                help="load weights holding NaN/Inf instead of refusing (you know why they are there)")
kernels_option = click.option("--kernels", type=click.Choice(list(KERNELS)), default="reference", show_default=True,
                              help="what dsmoe::route / dsmoe::moe run on the CPU: the reference ops, or the "
                                   "Triton GPU kernels under Triton's interpreter (slow; verifies the kernels)")
debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="show tracebacks for errors")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="override a config field (repeatable), e.g. --set num_hidden_layers=2")
absorb_option = click.option("--no-absorb-mla", is_flag=True,
                             help="MLA models: keep the expanded attention (skip absorb_mla; the cache is the latent either way)")


@click.group(context_settings=HELP)
@debug_option
@click.version_option(package_name="dsmoe")
def cli():
    """dsmoe: compile DeepSeek-style MoE models to fused graphs, ONNX Runtime and TensorRT."""


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--preset", default="small", show_default=True,
              help="tiny | small | deepseek-moe-16b | mla-tiny | mla-small | v3-small | deepseek-v2-lite")
@set_option
@click.option("--seed", default=0, show_default=True, type=SEED, help="random seed (same seed, same weights)")
@click.option("--dtype", default="float32", show_default=True, help="float32 | float16 | bfloat16")
@click.option("--force", is_flag=True, help="replace OUT_DIR if it exists")
def init(out_dir, preset, overrides, seed, dtype, force):
    """Write a random-weight checkpoint (HF layout) for a preset."""
    from dsmoe.config import DeepseekConfig
    from dsmoe.dtypes import parse_dtype
    from dsmoe.outputs import check_target
    from dsmoe.streaming import write_random_checkpoint

    config = DeepseekConfig.from_name(preset, **_overrides(overrides))
    tdtype = parse_dtype(dtype)
    check_target(out_dir, force=force)  # before minutes of work, not after
    with stage(f"initializing and writing {preset} ({_arch_line(config)}) to {out_dir}, layer by layer"):
        write_random_checkpoint(config, out_dir, seed=seed, dtype=tdtype, force=force)
    err.print(f"wrote {out_dir} ({preset}, seed {seed}, {dtype})")


@cli.command()
@click.argument("source")
@set_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def info(source, overrides, as_json):
    """Print the architecture: layers, experts, parameters total/active per token, bytes."""
    from rich.table import Table

    from dsmoe import load_config
    from dsmoe.architecture import architecture, attention_summary, kv_cache_report, notes
    from dsmoe.dtypes import parse_dtype

    config = load_config(source, _overrides(overrides))
    a = architecture(config)
    kv = kv_cache_report(config, parse_dtype(config.torch_dtype))
    if as_json:
        click.echo(json.dumps({**a.__dict__, "routing": config.routing.as_kwargs(), "model_type": config.model_type,
                               "attention": attention_summary(config), "kv_cache": kv, "notes": notes(config)}, indent=2))
        return
    t = Table(title=f"{source}", show_header=False)
    t.add_row("layers", f"{a.layers} ({len(a.dense_layers)} dense: {a.dense_layers}, {len(a.moe_layers)} MoE)")
    t.add_row("model_type / hidden", f"{config.model_type} / {config.hidden_size}")
    t.add_row("attention", attention_summary(config))
    t.add_row(f"KV cache / token ({kv['dtype']})",
              f"{kv['bytes_per_token'] / 1024:,.1f} KiB {'/'.join(kv['entries'])} ({kv['values_per_token_per_layer']} "
              f"values × {config.num_hidden_layers} layers)" + (
                  f"; expanded per-head K/V would be {kv['expanded_bytes_per_token'] / 1024:,.1f} KiB "
                  f"({kv['expanded_over_kept']:.1f}×)" if config.is_mla else ""))
    t.add_row("experts", f"{a.routed_experts} routed (top-{a.experts_per_token}) + {a.shared_experts} shared, "
                         f"width {config.moe_intermediate_size}")
    r = config.routing
    t.add_row("routing", f"{r.scoring}, {r.topk_method}, groups {r.n_group}/{r.topk_group}, "
                         f"norm {r.norm_topk_prob}, scale {r.scaling:g} ({r.scale_when})")
    t.add_row("parameters total", f"{a.params_total:,} ({a.params_total / 1e9:.2f}B)")
    t.add_row("parameters active / token", f"{a.params_active:,} ({a.params_active / 1e9:.2f}B)")
    t.add_row("one expert", f"{a.params_per_expert:,}")
    for name, b in a.bytes(a.params_total).items():
        t.add_row(f"bytes {name}", f"{b / 2**30:.2f} GiB")
    for note in notes(config):
        t.add_row("note", note)
    out.print(t)


@cli.command()
@click.argument("source")
@click.option("--prompt-ids", multiple=True, help='space-separated token ids, e.g. "1 2 3" (repeat for a batch)')
@click.option("--prompt", default=None, help="text (needs tokenizer.json in SOURCE)")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=click.Choice(GENERATE_BACKENDS), default="eager",
              show_default=True, help="ort: an export in dsmoe's loop; genai: an export in onnxruntime-genai; "
                                      "tensorrt: the engine of a --target tensorrt export (needs TensorRT and a GPU)")
@click.option("--dtype", default=None, help="float32 | float16 | bfloat16 (default: checkpoint's)")
@click.option("--fold-shared-experts", is_flag=True, help="fused backend: fold shared experts into dsmoe::moe")
@absorb_option
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N (eager and fused backends)")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="fused on cuda: replay decode steps from a CUDA graph over a static KV cache [default: on]")
@kernels_option
@nonfinite_option
@click.option("--router-stats", is_flag=True,
              help="record the routers' choices over the generation; print the expert-load report (stderr)")
@click.option("--router-stats-out", default=None, metavar="FILE.json", help="write that report as JSON")
@click.option("--force", is_flag=True, help="replace --router-stats-out if it exists")
@set_option
@click.option("--json", "as_json", is_flag=True,
              help='print {"ids": [...]} ([[...], ...] for a batch; with "router_stats" if recorded)')
@ep_options
def generate(source, prompt_ids, prompt, max_new_tokens, backend, dtype, fold_shared_experts, no_absorb_mla, device,
             cuda_graph, kernels, allow_nonfinite, router_stats, router_stats_out, force, overrides, as_json, **ep):
    """Greedy decoding with the KV cache (eager, fused graph, or an export in ORT, GenAI or TensorRT)."""
    from dsmoe.app.experts import generate_with_stats
    from dsmoe.app.experts_view import render as render_experts
    from dsmoe.app.generate import run_generate
    from dsmoe.app.step_timing import Timing

    kwargs = dict(source=source, prompt_ids=list(prompt_ids), prompt=prompt, max_new_tokens=max_new_tokens,
                  backend=backend, dtype=dtype, fold_shared_experts=fold_shared_experts, absorb_mla=not no_absorb_mla,
                  overrides=_overrides(overrides), device=device, cuda_graph=cuda_graph, kernels=kernels,
                  allow_nonfinite=allow_nonfinite, timing=Timing())
    report, ep = None, ep_kwargs(**ep)
    if router_stats_out:  # before the generation, not after
        check_output_file(router_stats_out, force=force, inputs=[source], option="--router-stats-out")
    if ep:
        ids, text = run_generate_ep(**{k: v for k, v in kwargs.items() if k != "timing"}, **ep,  # the ranks time nothing here
                                    router_stats=router_stats or router_stats_out)
    elif router_stats or router_stats_out:
        ids, text, report = generate_with_stats(**kwargs)
    else:
        ids, text = run_generate(**kwargs)
    if router_stats_out:
        write_output_file(router_stats_out, json.dumps(report, indent=2) + "\n", force=force, inputs=[source],
                          option="--router-stats-out")
    timing = kwargs["timing"]
    sizes = dict(prompt_tokens=_prompt_tokens(prompt_ids), new_tokens=sum(map(len, ids)), rows=len(ids))
    if as_json:
        click.echo(json.dumps({"ids": ids if len(ids) > 1 else ids[0]} | ({"text": text} if text is not None else {})
                              | ({"router_stats": report} if router_stats else {}) | {"timing": timing.as_dict(**sizes)}))
    else:
        if text is not None:
            click.echo(text)
        else:
            for row in ids:
                click.echo(" ".join(map(str, row)))
        if router_stats:
            render_experts(report, err)
        click.echo(timing.line(**sizes), err=True)


def _prompt_tokens(prompt_ids) -> int | None:
    """Prompt tokens as given (ids; a --prompt's count is the tokenizer's and not known here)."""
    return sum(len(p.split()) for p in prompt_ids) if prompt_ids else None


@cli.command()
@click.argument("source")
@click.option("--prompt-ids", default=None, help='one prompt of space-separated token ids, e.g. "1 2 3"')
@click.option("--prompt-file", default=None, metavar="FILE",
              help="one prompt per line: text when SOURCE has tokenizer.json, else token ids")
@click.option("--random", "random_prompts", default=None, type=int, metavar="N", help="N random prompts (seeded)")
@click.option("--seq-len", default=None, type=int, help="tokens per --random prompt [default: 64]")
@click.option("--seed", default=None, type=SEED, help="seed of the --random prompts [default: 0]")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="eager | fused | ort [default: ort for an export directory, else eager]")
@click.option("--dtype", default=None, help="float32 | float16 | bfloat16 (checkpoints and presets)")
@click.option("--compare", default=None, metavar="OTHER", help="run the same prompts through OTHER; report the drift")
@click.option("--compare-backend", type=click.Choice(BACKENDS), default=None, help="backend of OTHER")
@click.option("--compare-dtype", default=None, help="dtype of OTHER")
@click.option("--place", default=None, type=int, metavar="N", help="propose a placement of the experts on N devices")
@click.option("--top-pairs", default=5, show_default=True, type=click.IntRange(min=0), help="co-chosen expert pairs per layer")
@click.option("--plot", default=None, metavar="FILE.png", help="write a load heatmap and imbalance chart")
@click.option("--by-domain", "by_domain", multiple=True, metavar="NAME=FILE",
              help="text of one domain (repeat for each): expert use per domain, MI(domain; expert), shared share")
@click.option("--max-prompts", default=64, show_default=True, type=click.IntRange(min=1),
              help="--by-domain: prompts of --seq-len per domain, at most")
@click.option("--force", is_flag=True, help="replace --plot if it exists")
@set_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def experts(source, prompt_ids, prompt_file, random_prompts, seq_len, seed, backend, dtype, compare, compare_backend,
            compare_dtype, place, top_pairs, plot, by_domain, max_prompts, force, overrides, as_json):
    """Where the tokens go: expert load per MoE layer, routing drift against another source, placement."""
    from dsmoe.app.experts import run_experts
    from dsmoe.app.experts_view import render as render_experts
    from dsmoe.streaming import random_init_seed

    with stage(f"routing prompts through {source}"):
        doc = run_experts(source=source, prompt_ids=prompt_ids, prompt_file=prompt_file, random=random_prompts,
                          seq_len=seq_len, seed=seed, backend=backend, dtype=dtype, overrides=_overrides(overrides),
                          compare=compare, compare_backend=compare_backend, compare_dtype=compare_dtype, place=place,
                          top_pairs=top_pairs, plot=plot, force=force, by_domain=list(by_domain), max_prompts=max_prompts)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        render_experts(doc, out)
        if random_init_seed(source) is not None:
            err.print("[yellow]random weights: this is how random routers spread the tokens, not how a trained model "
                      "routes them[/yellow]")
        if "by_domain" in doc:
            from dsmoe.app.experts_domain import render_domains

            render_domains(doc["by_domain"], out)


@cli.command()
@click.argument("source")
@click.option("--dump-after", default=None, metavar="PASS", help="print the graph after this pass")
@click.option("--fold-shared-experts", is_flag=True, help="also run fold_shared_experts")
@absorb_option
@click.option("--no-verify", is_flag=True, help="skip the per-pass numerical check")
@click.option("--dtype", default=None, help="float32 | float16 | bfloat16")
@kernels_option
@nonfinite_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def inspect(source, dump_after, fold_shared_experts, no_absorb_mla, no_verify, dtype, kernels, allow_nonfinite, overrides,
            as_json):
    """Capture the model, run the passes with verification, print what each pass did."""
    from rich.table import Table

    from dsmoe.app.inspection import run_inspect

    doc = run_inspect(source=source, dump_after=dump_after, fold_shared_experts=fold_shared_experts,
                      absorb_mla=not no_absorb_mla,
                      verify=not no_verify, dtype=dtype, overrides=_overrides(overrides),
                      dump=lambda text: click.echo(text, err=as_json), status=stage, kernels=kernels,
                      allow_nonfinite=allow_nonfinite)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    t = Table(title=f"passes on {source} (capture {doc['capture_seconds']:.1f} s)")
    for col in ("pass", "rewrites", "nodes", "param MB", "max abs err", "time s"):
        t.add_column(col, justify="left" if col == "pass" else "right", no_wrap=True)
    t.add_row("(captured)", "", str(doc["captured_nodes"]), f"{doc['captured_param_bytes'] / 1e6:.1f}", "", "")
    for p in doc["passes"]:
        e = "-" if p["max_abs_err"] is None else f"{p['max_abs_err']:.2e}"
        t.add_row(p["name"], str(p["rewrites"]), f"{p['nodes_before']} → {p['nodes_after']}",
                  f"{p['param_bytes'] / 1e6:.1f}", e, f"{p['seconds']:.2f}")
    out.print(t)
    _print_skipped(doc["passes"], out)
    h = Table(title="final op histogram (top 12 + dsmoe ops)")
    h.add_column("op")
    h.add_column("count", justify="right")
    for i, (op, n) in enumerate(doc["ops"].items()):
        if i < 12 or op.startswith("dsmoe::"):
            h.add_row(op, str(n))
    out.print(h)


def _print_skipped(passes: list[dict], console) -> None:
    """The regions a pass left alone, with the reason (``inspect`` and ``export`` both show them)."""
    for p in passes:
        for reason in p["skipped"]:
            console.print(f"[yellow]{p['name']} left alone[/yellow] {reason}")


def _export_options(f):
    for opt in reversed([
        click.argument("source"),
        click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="output directory"),
        click.option("--target", default="ort", show_default=True, help="ort | portable | tensorrt"),
        click.option("--dtype", default="fp32", show_default=True, help="fp32 | fp16 (tensorrt: also bf16)"),
        click.option("--kv-cache", default="dynamic", show_default=True,
                     help="dynamic | static (past = a preallocated buffer, GenAI's past_present_share_buffer)"),
        click.option("--verify", is_flag=True, help="compare ONNX Runtime (tensorrt: the engine) with eager; "
                                                    "exit 1 beyond tolerance"),
        click.option("--router-stats", is_flag=True,
                     help="add the routers' choices as outputs (router.{layer}.ids, .weights, …)"),
        click.option("--arch", "archs", default=None, help="tensorrt: GPU architectures of the plugin library "
                                                           "[default: sm_80,sm_90]"),
        click.option("--engine", is_flag=True, help="tensorrt: also build model.engine (needs TensorRT and a GPU)"),
        click.option("--max-batch", type=int, default=None, help="tensorrt: the engine profile's largest batch [4]"),
        click.option("--max-length", type=int, default=None,
                     help="tensorrt: the profile's largest past + sequence [min(2048, max_position_embeddings)]"),
        click.option("--quant", default=None, metavar="int8|int4",
                     help="ort | portable: weight-only block quantization (router and embeddings stay fp32)"),
        click.option("--block-size", default=None, type=int, metavar="32|64|128",
                     help="weights per quantization block along the input dimension [default: auto, per weight the "
                          "largest of 128, 64, 32 that divides its input dimension]"),
        click.option("--quant-scope", default=None, metavar="all|experts",
                     help="all: every linear but the router (attention, lm_head, MLPs); experts: routed + shared "
                          "experts and dense MLPs only [default: all]"),
        click.option("--asymmetric", is_flag=True, help="per-block zero points (default: symmetric blocks)"),
        click.option("--stream/--no-stream", default=None,
                     help="with --quant: export a checkpoint one layer at a time [default: when the fp32 model "
                          "would not fit in memory]"),
        click.option("--eval-text", "eval_text", multiple=True, metavar="FILE",
                     help="with --quant: score the export against the source (eager fp32) on this held-out text, as "
                          "dsmoe eval (repeatable; needs the source's tokenizer.json); the report's quality"),
        click.option("--eval-ctx", type=int, default=None, help="--eval-text's window length in tokens [256]"),
        click.option("--force", is_flag=True, help="replace --out if it exists and dsmoe wrote it"),
        nonfinite_option,
        absorb_option,
        set_option,
        debug_option,
    ]):
        f = opt(f)
    return f


def _export(source, out_dir, target, dtype, kv_cache, verify, router_stats, archs, engine, max_batch, max_length, quant,
            block_size, quant_scope, asymmetric, stream, eval_text, eval_ctx, force, allow_nonfinite, no_absorb_mla, overrides):
    """Export SOURCE to ONNX (fused MoE ops) in --out, optionally verified in ONNX Runtime
    (--target tensorrt: plugin nodes, the plugin library and the engine command lines; --quant:
    weight-only int8/int4 weights, their exactness and accuracy measured and reported)."""
    from dsmoe.app import text_quality
    from dsmoe.export import export_model
    from dsmoe.streaming import random_init_seed

    current = {"s": None}

    def progress(name: str) -> None:
        if current["s"] is not None:
            current["s"].__exit__(None, None, None)
        current["s"] = stage(f"{name} …")
        current["s"].__enter__()
        err.print(f"[dim]· {name}[/dim]")

    try:
        report = export_model(source, out=str(out_dir), target=target, dtype=dtype, verify=verify, force=force,
                              overrides=_overrides(overrides), kv_cache=kv_cache, router_stats=router_stats,
                              absorb_mla=not no_absorb_mla, progress=progress, allow_nonfinite=allow_nonfinite,
                              archs=_archs(archs), engine=engine, max_batch=max_batch, max_length=max_length,
                              quant=quant, block_size=block_size, quant_scope=quant_scope, asymmetric=asymmetric,
                              stream=stream, eval_text=list(eval_text) or None, eval_ctx=eval_ctx,
                              evaluator=text_quality if eval_text or eval_ctx is not None else None)
    finally:
        if current["s"] is not None:
            current["s"].__exit__(None, None, None)
    _print_skipped(report["passes"], err)
    v = report.get("verification")
    q = report.get("quant")
    what = f"{dtype}" if not q else f"{q['scheme']['type']}, blocks {q['scheme']['block_size']}, scope {q['scheme']['scope']}"
    err.print(f"wrote {out_dir} (target {target}, {what}, {kv_cache} KV cache)"
              + (f"; verified: {v.get('summary', v)}" if v else ""))
    if target == "tensorrt":
        engine_built = (Path(out_dir) / "model.engine").is_file()
        err.print(("next: " if engine_built else f"next, where TensorRT and a GPU are: sh {out_dir}/build_engine.sh "
                   "(trtexec; or: build_engine.sh polygraphy), then: ")
                  + f"dsmoe generate {out_dir} --backend tensorrt --prompt-ids \"1 17 42 7\"", highlight=False)
    if q:
        a = q["quality"]
        if q["streamed"]:
            err.print(f"streamed layer by layer: peak RSS {q['peak_rss_bytes'] / 2**30:.2f} GiB, "
                      f"{report['model_bytes'] / 2**30:.2f} GiB written")
        seed = random_init_seed(source)
        if seed is not None:
            err.print(f"[yellow]random weights (seed {seed}): the accuracy below measures nothing about a trained "
                      "model — int4 of noise drifts far; quantize a real checkpoint to judge it[/yellow]")
        err.print(f"vs the unquantized model on {a['prompts']} prompts × {a['prompt_len']} tokens: top-1 agreement "
                  f"{a['top1_agreement']:.1%}, mean KL {a['mean_kl']:.3g}, max |logit error| {a['max_abs_logit_err']:.3g}, "
                  f"routing drift {a['routing_drift_mean']:.1%} (mean over MoE layers); "
                  f"{q['bytes']['total'] / 2**20:,.1f} MiB of weights ({q['bytes_unquantized']['total'] / 2**20:,.1f} MiB fp32)")
    t = report.get("quality")
    if t:
        err.print(f"vs the unquantized model on held-out text ({', '.join(f['name'] for f in t['text_files'])}; "
                  f"{t['tokens_scored']} tokens scored, ctx {t['ctx']}): PPL {t['ppl']:.4f} vs {t['baseline_ppl']:.4f} "
                  f"(ratio {t['ppl_ratio']:.5f}), mean KLD {t['kld_mean']:.6f} (99%: {t['kld_p99']:.5f}, "
                  f"99.9%: {t['kld_p99_9']:.5f}), same top-1 {100 * t['same_top1']:.2f} %", highlight=False)


cli.add_command(click.command("export")(_export_options(_export)))
export_cmd = click.command("dsmoe-export", context_settings=HELP)(_export_options(_export))  # its own copy of the options


@cli.command()
@click.option("--suite", type=click.Choice([*SUITES, "quant-full", "serve", "all"]), default="all", show_default=True,
              help="all = moe-layer, model, quant (dsmoe int4/int8 vs llama.cpp's own GGUFs, 4 layers at 16B width; "
                   "--quick: tiny, checked against eager); quant-full (the whole 28-layer int4 model vs llama.cpp) and "
                   "serve (dsmoe serve under locust vs llama-server) run alone")
@click.option("--backend", "backends", multiple=True, help="restrict to these backends (repeatable)")
@click.option("--quick", is_flag=True, help="small sizes, few iterations: a smoke run of every backend (about 2 minutes "
                                            "on 2 idle cores, < 2 GiB peak RSS); goals are not judged")
@click.option("--out", "out_dir", default="out/bench", show_default=True, type=click.Path(path_type=Path),
              help="results folder (<machine>-<suite>.json/.md/.png); --out benchmarks/results to commit a run")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads (default: all cores)")
@click.option("--preset", default=None, help="model preset instead of the suite's default (e.g. small)")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N (GPU sizes and limits)")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 [default: float32 on cpu, bfloat16 on cuda]")
@click.option("--force", is_flag=True, help="replace results files of an earlier run in --out")
@set_option
def bench(suite, backends, quick, out_dir, threads, preset, device, dtype, force, overrides):
    """Benchmark eager vs fused vs ONNX Runtime (and the CUDA kernels) against this machine's limits."""
    from dsmoe.bench import run_bench
    from dsmoe.bench.quant_full import refuse_unused, run_quant_full

    if suite == "quant-full":
        refuse_unused(backends=backends, quick=quick, preset=preset, device=device, dtype=dtype, overrides=overrides)
        run_quant_full(threads=threads, out_dir=str(out_dir), progress=lambda s: err.print(f"[dim]· {s}[/dim]"), force=force)
        return
    if suite == "serve":
        from dsmoe.bench.serve_bench import run_serve_bench
        unused = [flag for flag, given in (("--backend", bool(backends)), ("--device", device != "cpu"),
                                           ("--dtype", dtype is not None), ("--set", bool(overrides))) if given]
        if unused:
            raise DsmoeError(f"{', '.join(unused)} do(es) not apply to --suite serve (dsmoe serve's int4 export "
                             "against llama-server on the CPU); drop it")
        run_serve_bench(out_dir=str(out_dir), preset=preset or "small", threads=threads, quick=quick, force=force,
                        progress=lambda s: err.print(f"[dim]· {s}[/dim]"))
        return
    suites = list(SUITES) if suite == "all" else [suite]
    run_bench(suites=suites, backends=list(backends) or None, quick=quick, out_dir=str(out_dir), threads=threads,
              preset=preset, overrides=_overrides(overrides) or None, progress=lambda s: err.print(f"[dim]· {s}[/dim]"),
              device=device, dtype=dtype, force=force)


def _archs(text: str | None) -> list[str] | None:
    archs = None if text is None else [a.strip() for a in text.split(",") if a.strip()]
    if archs == []:
        raise DsmoeError("--arch names no GPU architecture (e.g. --arch sm_80,sm_90)")
    return archs


@cli.command("build-plugins")
@click.option("--arch", "archs", default="sm_80,sm_90", show_default=True, help="comma-separated GPU architectures")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="output directory")
@click.option("--force", is_flag=True, help="replace --out if dsmoe wrote it")
@click.option("--no-cache", is_flag=True, help="build from scratch even when an identical build is cached")
def build_plugins_cmd(archs, out_dir, force, no_cache):
    """Build the TensorRT plugin library (libdsmoe_trt_plugins.so: DsRoute, DsMoE) with nvcc, no GPU needed."""
    from dsmoe.plugins.trt.build import write_plugin_library

    b = write_plugin_library(archs=_archs(archs), out=out_dir, force=force, cache=not no_cache)
    err.print(f"wrote {out_dir}: {b.library.name} ({len(b.manifest['kernels'])} kernels for {archs}"
              f"{', cached build' if b.cached else ''})")


@cli.command("build-kernels")
@click.option("--arch", "archs", default="sm_80,sm_90", show_default=True, help="comma-separated GPU architectures")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="output directory")
@click.option("--force", is_flag=True, help="replace --out if dsmoe wrote it")
def build_kernels_cmd(archs, out_dir, force):
    """Compile the Triton kernels ahead of time (cubin + PTX + manifest.json), no GPU needed."""
    from dsmoe.outputs import OutputDir
    from dsmoe.plugins import build_kernels

    with OutputDir(out_dir, force=force, kind="kernels") as staging:
        try:
            manifest = build_kernels(_archs(archs), staging.path)
        except (ValueError, RuntimeError) as e:
            raise DsmoeError(str(e)) from None
        staging.commit()
    err.print(f"wrote {out_dir}: {len(manifest['kernels'])} kernels for {archs}")


def _arch_line(config) -> str:
    from dsmoe.architecture import architecture

    a = architecture(config)
    return f"{a.params_total / 1e6:,.0f}M parameters"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """dsmoe's own warnings as one ``warning:`` line; others as Python shows them."""
    if issubclass(category, DsmoeWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


class _Notes(logging.Handler):
    """The library's notes (``logging.getLogger("dsmoe")``: e.g. skipped MTP layers) as ``note: …`` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"note: {record.getMessage()}", err=True)


_NOTES = _Notes(logging.INFO)


def _run(command: click.Command, argv=None, prog_name: str = "dsmoe") -> None:
    _state["debug"] = False
    warnings.showwarning = _show_warning
    log = logging.getLogger("dsmoe")
    if _NOTES not in log.handlers:
        log.addHandler(_NOTES)
        log.setLevel(logging.INFO)
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # a bare `dsmoe` / `dsmoe CMD`: its help
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:  # click's own errors (usage: exit 2) in dsmoe's one-line style
        click.echo(f"error: {_click_message(e)}", err=True)
        sys.exit(e.exit_code)
    except DsmoeError as e:
        if _state["debug"]:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if _state["debug"]:
            raise
        click.echo(f"error: {e.strerror or e}: {e.filename}", err=True)
        sys.exit(2)
    except OSError as e:
        if _state["debug"] or not write_failure(e):
            raise
        click.echo(f"error: {write_failure(e)}", err=True)
        sys.exit(2)


def _click_message(e: click.ClickException) -> str:
    """One line: click's message, and where a usage error's command lists its options."""
    text = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


def main(argv=None) -> None:
    _run(cli, argv)


def export_main(argv=None) -> None:
    _run(export_cmd, argv, "dsmoe-export")


# Commands in modules of their own (each imports only click and light modules at the top):
from dsmoe.app.compare_cmd import compare_backends_cmd  # noqa: E402
from dsmoe.app.eval_cmd import eval_cmd  # noqa: E402
from dsmoe.app.plan_cmd import plan  # noqa: E402
from dsmoe.app.serve_cmd import serve  # noqa: E402

cli.add_command(compare_backends_cmd)
cli.add_command(serve)
cli.add_command(plan)
cli.add_command(eval_cmd)
