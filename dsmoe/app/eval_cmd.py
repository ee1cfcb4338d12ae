"""``dsmoe eval``: perplexity / bits per byte, and KL divergence against a baseline (click only here)."""

from __future__ import annotations

import json

import click

BACKEND_CHOICES = ("eager", "fused", "ort", "genai")


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--text", "text", multiple=True, required=True, metavar="FILE",
              help="UTF-8 text to score (repeatable; files are joined by a blank line)")
@click.option("--ctx", type=int, default=512, show_default=True, help="window length in tokens")
@click.option("--stride", type=int, default=None, help="tokens between window starts (default: --ctx)")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default=None,
              help="default: eager for a checkpoint, ort for an export")
@click.option("--baseline", default=None, metavar="SOURCE_OR_EXPORT", help="compare with this model, run alongside")
@click.option("--baseline-backend", type=click.Choice(BACKEND_CHOICES), default=None,
              help="the baseline's backend (default: eager for a checkpoint, ort for an export)")
@click.option("--baseline-logits", default=None, metavar="FILE", help="compare with logits saved by --save-logits")
@click.option("--save-logits", default=None, metavar="FILE",
              help="write this model's log-probabilities (fp16 safetensors) for later --baseline-logits")
@click.option("--force", is_flag=True, help="replace an existing --save-logits file")
@click.option("--dtype", type=click.Choice(("float32", "bfloat16", "float16")), default="float32", show_default=True,
              help="weights dtype of a checkpoint on eager/fused")
@click.option("--threads", type=int, default=None, help="CPU threads (torch / ONNX Runtime)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--no-progress", is_flag=True, help="no progress bar on stderr")
def eval_cmd(source, text, ctx, stride, backend, baseline, baseline_backend, baseline_logits, save_logits, force, dtype,
             threads, as_json, no_progress):
    """Perplexity of SOURCE (checkpoint or export) on --text, and its divergence from a baseline.

    Windows of --ctx tokens; each scores the predictions after its first half (llama-perplexity's
    convention). Against --baseline or --baseline-logits: PPL ratio, mean KLD and percentiles,
    same top-1 %, Δp.
    """
    from dsmoe.app.evaluate.report import format_result
    from dsmoe.app.evaluate.run import run_eval

    result = run_eval(source=source, text=list(text), ctx=ctx, stride=stride, backend=backend, baseline=baseline,
                      baseline_backend=baseline_backend, baseline_logits=baseline_logits, save_logits=save_logits,
                      force=force, dtype=dtype, threads=threads, progress=not no_progress)
    click.echo(json.dumps(result, indent=2) if as_json else format_result(result))
