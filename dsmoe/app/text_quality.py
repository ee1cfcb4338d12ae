"""A quantized export against its unquantized source on held-out text (``dsmoe-export --eval-text``).

Nothing is computed here: :func:`dsmoe.app.evaluate.run.run_eval` scores the export (ONNX Runtime)
against the source (eager, fp32) exactly as ``dsmoe eval EXPORT --baseline SOURCE`` does, and this
module checks the options up front (eval's own checks, before any export work) and keeps the
statistics the export report's ``quality`` block carries.
"""

from __future__ import annotations

from pathlib import Path

from dsmoe.errors import DsmoeError

DEFAULT_CTX = 256


def _as_export_option(e: DsmoeError) -> DsmoeError:
    """Eval's message, in the export's option names (``--text`` → ``--eval-text``, ``--ctx`` → ``--eval-ctx``)."""
    msg = str(e).replace("--text", "--eval-text").replace("--ctx", "--eval-ctx")
    return DsmoeError(msg if "--eval-" in msg else f"--eval-text: {msg}")


def check_eval_text(source: str, *, files: list[str] | None, ctx: int | None, quantized: bool, stream: bool,
                    max_positions: int) -> int | None:
    """Refuse (one line) what ``--eval-text``/``--eval-ctx`` cannot measure; returns the window
    length to use (None without ``--eval-text``)."""
    if not files:
        if ctx is not None:
            raise DsmoeError("--eval-ctx applies only with --eval-text")
        return None
    if not quantized:
        raise DsmoeError("--eval-text applies only with --quant (it compares the quantized export with its source)")
    if stream:
        raise DsmoeError("--eval-text does not apply to a streamed export (its fp32 baseline would have to fit in memory)")
    if not (Path(source) / "tokenizer.json").is_file():
        raise DsmoeError(f"--eval-text needs the source's tokenizer.json, and {source} has none (eval reads text)")
    from dsmoe.app.evaluate.run import make_windows, read_text, tokenizer_of

    ctx = DEFAULT_CTX if ctx is None else ctx
    try:
        body = read_text(files)
        tokens = tokenizer_of(source).encode(body, add_special_tokens=False).ids
        make_windows(tokens, ctx, None)
    except DsmoeError as e:
        raise _as_export_option(e) from None
    if ctx > max_positions:
        raise DsmoeError(f"--eval-ctx {ctx} exceeds the model's {max_positions} positions (max_position_embeddings)")
    return ctx


def text_quality(export_dir: str | Path, source: str, *, files: list[str], ctx: int) -> dict:
    """The export (ort) against ``source`` (eager, fp32) on ``files``: the report's ``quality`` block."""
    from dsmoe.app.evaluate.run import run_eval

    try:
        r = run_eval(source=str(export_dir), text=list(files), ctx=ctx, backend="ort", baseline=str(source),
                     baseline_backend="eager", dtype="float32", progress=False)
    except DsmoeError as e:
        raise _as_export_option(e) from None
    b = r["baseline"]
    return {"ppl": r["ppl"], "baseline_ppl": b["ppl"], "ppl_ratio": b["ppl_ratio"], "kld_mean": b["kld_mean"],
            "kld_p99": b["kld_percentiles"]["99"], "kld_p99_9": b["kld_percentiles"]["99.9"],
            "same_top1": b["same_top1"], "tokens_scored": r["tokens"], "ctx": ctx, "windows": r["windows"],
            "text_tokens": r["text_tokens"], "baseline": "the source, eager fp32", "backend": "ort",
            "convention": r["convention"],
            "text_files": [{"name": Path(f).name, "bytes": Path(f).stat().st_size} for f in files]}
