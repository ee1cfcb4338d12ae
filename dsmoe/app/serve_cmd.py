"""``dsmoe serve``: the click command (imports nothing heavy; :func:`dsmoe.app.serve.run_serve` does the work)."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port (0: any free port)")
@click.option("--backend", type=click.Choice(["ort", "eager", "fused", "genai", "tensorrt"]), default=None,
              help="ort for an export directory (default there), eager (default for a checkpoint) or fused; "
                   "genai and tensorrt are refused (their loops cannot batch joining requests)")
@click.option("--max-running", default=8, show_default=True, type=int, help="sequences decoded together (KV slots)")
@click.option("--max-model-len", default=None, type=int,
              help="context per sequence, prompt + generated (default: max_position_embeddings)")
@click.option("--max-step-tokens", default=512, show_default=True, type=int,
              help="tokens per engine step (decode rows + prefill); longer prompts are prefilled in chunks")
@click.option("--max-waiting", default=256, show_default=True, type=int, help="queued requests before 429")
@click.option("--max-body", default=1 << 20, show_default=True, type=int, help="largest request body in bytes (413)")
@click.option("--api-key", default=None, envvar="DSMOE_API_KEY",
              help="require 'Authorization: Bearer KEY' on /v1 (or set DSMOE_API_KEY)")
@click.option("--served-model-name", default=None, help="the model id clients send (default: SOURCE's folder name)")
@click.option("--expert-stats", type=click.Choice(["layer", "per-expert", "off"]), default="layer", show_default=True,
              help="live expert load in /metrics: per-layer summaries, plus per-expert series, or off")
@click.option("--expert-window", default=60.0, show_default=True, type=float,
              help="seconds of traffic behind the imbalance and never-chosen gauges")
@click.option("--dtype", default=None, help="float32 | float16 | bfloat16 (checkpoints and presets)")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads (default: the cores)")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="seconds SIGTERM waits for requests in flight")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="warning",
              show_default=True, help="uvicorn's log level")
def serve(source, host, port, backend, max_running, max_model_len, max_step_tokens, max_waiting, max_body, api_key,
          served_model_name, expert_stats, expert_window, dtype, threads, drain_timeout, log_level):
    """Serve SOURCE (an export directory, a checkpoint or preset:NAME) with an OpenAI-compatible API:
    /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /v1/experts."""
    from dsmoe.app.serve import run_serve

    run_serve(source=source, host=host, port=port, backend=backend, max_running=max_running,
              max_model_len=max_model_len, max_step_tokens=max_step_tokens, max_waiting=max_waiting,
              max_body=max_body, api_key=api_key, served_model_name=served_model_name, expert_stats=expert_stats,
              expert_window=expert_window, dtype=dtype, threads=threads, drain_s=drain_timeout, log_level=log_level)
