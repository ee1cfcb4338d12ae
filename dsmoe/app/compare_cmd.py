"""``dsmoe compare-backends``: the same greedy generation on several backends, checked token for token."""

from __future__ import annotations

import json

import click

from dsmoe.app.choices import GENERATE_BACKENDS

DEFAULT = ("eager", "fused", "ort", "genai")


@click.command("compare-backends")
@click.argument("model")
@click.argument("export", required=False)
@click.option("--prompt-ids", required=True, help='space-separated token ids, e.g. "1 17 42 7"')
@click.option("--max-new-tokens", default=16, show_default=True)
@click.option("--backend", "backends", multiple=True, type=click.Choice(GENERATE_BACKENDS),
              help="a backend to run (repeatable; the first is the reference) [default: eager, fused, ort, genai]")
@click.option("--json", "as_json", is_flag=True, help="print the tokens and the verdict as JSON")
def compare_backends_cmd(model, export, prompt_ids, max_new_tokens, backends, as_json):
    """Generate greedily on each backend (MODEL: checkpoint or preset; EXPORT: its ONNX export) and
    check the tokens agree; exit 1 naming the first token where one differs."""
    from dsmoe.app.agreement import BackendsDisagree, compare_backends

    doc = compare_backends(model=model, export=export, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                           backends=list(backends or DEFAULT))
    if as_json:
        click.echo(json.dumps(doc))
    else:
        width = max(map(len, doc["tokens"]))
        for name, ids in doc["tokens"].items():
            click.echo(f"{name:<{width}}  {' '.join(map(str, ids))}")
        if doc["agree"]:
            click.echo(doc["summary"])
    if not doc["agree"]:
        raise BackendsDisagree(doc["summary"])
