"""``dsmoe eval``: score text in windows, as llama.cpp's ``llama-perplexity`` does.

The text (the ``--text`` files joined by a blank line) is tokenized once with the source's
``tokenizer.json``, without BOS. Windows of ``ctx`` tokens start every ``stride`` tokens (default
``ctx``: disjoint chunks, llama.cpp's layout); each window is one prefill from an empty cache and
scores only the predictions after its first half — positions ``ctx//2 … ctx−2`` predicting tokens
``ctx//2+1 … ctx−1`` (``ctx − 1 − ctx//2`` tokens), exactly llama.cpp's ``first = n_ctx/2``
convention, so each scored token has at least half a window of context. Strides shorter than that
scored span would count tokens twice and are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsmoe.errors import DsmoeError


@dataclass
class Windows:
    tokens: list[int]
    starts: list[int]
    ctx: int
    first: int  # scored predictions come from positions first … ctx-2

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first


def make_windows(tokens: list[int], ctx: int, stride: int | None) -> Windows:
    if ctx < 4:
        raise DsmoeError(f"--ctx must be at least 4, got {ctx}")
    stride = ctx if stride is None else stride
    first = ctx // 2
    if not ctx - 1 - first <= stride <= ctx:
        raise DsmoeError(f"--stride must be between {ctx - 1 - first} (the {ctx - 1 - first} tokens a window scores; "
                         f"shorter would count tokens twice) and --ctx {ctx}, got {stride}")
    if len(tokens) < ctx:
        raise DsmoeError(f"the text is {len(tokens)} tokens, shorter than one window of --ctx {ctx}")
    return Windows(tokens, list(range(0, len(tokens) - ctx + 1, stride)), ctx, first)


def read_text(files: list[str | Path]) -> str:
    if not files:
        raise DsmoeError("give at least one --text FILE")
    parts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise DsmoeError(f"--text {f} does not exist")
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DsmoeError(f"--text {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise DsmoeError("the --text is empty")
    return text


def tokenizer_of(source: str | Path):
    from dsmoe.app.generate import load_tokenizer

    path = Path(source) / "tokenizer.json"
    if not path.is_file():
        raise DsmoeError(f"{source} has no tokenizer.json: eval reads text, and needs the model's tokenizer")
    return load_tokenizer(path, what="dsmoe eval")


def byte_counter(tok, body: str, offsets, tokens: list[int]):
    """``count(a, b)``: the bytes of text that tokens ``a…b`` (inclusive) stand for.

    Byte-level BPE (decoder ``ByteLevel``): exact, each token's own bytes (GPT-2's byte ↔ character
    table), added tokens by their UTF-8 content. Other tokenizers: from the tokens' character
    offsets, a character split between two tokens counted with the first.
    """
    import json

    import numpy as np

    if (json.loads(tok.to_str()).get("decoder") or {}).get("type") == "ByteLevel":
        table = _byte_level_chars()
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        size = {}
        for t in set(tokens):
            piece = tok.id_to_token(t)
            size[t] = len(piece.encode()) if piece in added or any(c not in table for c in piece) else len(piece)
        cum = np.concatenate([[0], np.cumsum([size[t] for t in tokens])])
    else:
        char_bytes = np.concatenate([[0], np.cumsum([len(c.encode()) for c in body])])
        cum = np.concatenate([[0], char_bytes[[end for _, end in offsets]]])
        cum = np.maximum.accumulate(cum)
    return lambda a, b: int(cum[b + 1] - cum[a])


def _byte_level_chars() -> set[str]:
    """The 256 characters GPT-2's byte-level alphabet maps bytes to."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {chr(c) for c in keep} | {chr(256 + i) for i in range(len(extra))}


def vocab_digest(tok) -> str:
    return hashlib.sha256(repr(sorted(tok.get_vocab(with_added_tokens=True).items())).encode()).hexdigest()


def run_eval(*, source: str, text: list[str], ctx: int = 512, stride: int | None = None, backend: str | None = None,
             baseline: str | None = None, baseline_backend: str | None = None, baseline_logits: str | None = None,
             save_logits: str | None = None, force: bool = False, dtype: str = "float32", threads: int | None = None,
             progress: bool = True) -> dict:
    """Perplexity and bits per byte of ``source`` on ``text``; with a baseline, PPL ratio, KLD, same-top-1 and Δp."""
    from dsmoe.app.evaluate.backends import default_backend, open_model
    from dsmoe.app.evaluate.logits_file import SavedLogits
    from dsmoe.app.evaluate.logits_file import save_logits as write_logits
    from dsmoe.app.evaluate.metrics import Scores, log_softmax

    if baseline and baseline_logits:
        raise DsmoeError("give --baseline or --baseline-logits, not both")
    if baseline_backend and not baseline:
        raise DsmoeError("--baseline-backend needs --baseline")
    if save_logits:
        _check_output(save_logits, force=force, inputs=[*text, source, baseline_logits])
    body = read_text(text)
    tok = tokenizer_of(source)
    enc = tok.encode(body, add_special_tokens=False)
    tokens = list(enc.ids)
    nbytes_of = byte_counter(tok, body, enc.offsets, tokens)
    windows = make_windows(tokens, ctx, stride)
    model = open_model(source, backend, dtype=dtype, threads=threads)
    _check_vocab(model.vocab_size, tokens, source, tok)
    if ctx > model.max_positions:
        raise DsmoeError(f"--ctx {ctx} exceeds the model's {model.max_positions} positions (max_position_embeddings)")
    base_model = saved = None
    if baseline:
        base_tok = tokenizer_of(baseline) if (Path(baseline) / "tokenizer.json").is_file() else None
        if base_tok is not None and vocab_digest(base_tok) != vocab_digest(tok):
            raise DsmoeError(f"the baseline {baseline} has another vocabulary (its tokenizer.json differs from {source}'s)")
        base_model = open_model(baseline, baseline_backend or default_backend(baseline), dtype=dtype, threads=threads)
        if base_model.vocab_size != model.vocab_size:
            raise DsmoeError(f"the baseline {baseline} has another vocabulary ({base_model.vocab_size} tokens, "
                             f"the model {model.vocab_size})")
    elif baseline_logits:
        saved = SavedLogits(baseline_logits)
        saved.check(tokens, ctx=ctx, stride=windows.ctx if stride is None else stride, vocab=model.vocab_size)
    scores, kept = Scores(), []
    n = windows.scored_per_window
    with _bar(progress, len(windows.starts), model.name) as advance:
        for w in windows.starts:
            ids = tokens[w:w + ctx]
            logp = log_softmax(model.score(ids)[windows.first:ctx - 1])
            targets = np.asarray(ids[windows.first + 1:], dtype=np.int64)
            nbytes = nbytes_of(w + windows.first + 1, w + ctx - 1)
            base = None
            if base_model is not None:
                base = log_softmax(base_model.score(ids)[windows.first:ctx - 1])
            elif saved is not None:
                base = saved.next(n)
            scores.add(logp, targets, nbytes, base)
            if save_logits:
                kept.append(logp.astype(np.float16))
            advance()
    result = {"model": model.name, "backend": model.backend, "ctx": ctx, "stride": stride or ctx, "windows": len(windows.starts),
              "text_tokens": len(tokens), "text_bytes": len(body.encode()),
              "convention": f"windows of {ctx} tokens every {stride or ctx}; each scores its last {n} predictions "
                            f"(after the first {windows.first} tokens), as llama-perplexity",
              **scores.summary()}
    if base_model is not None or saved is not None:
        result["baseline"]["name"] = base_model.name if base_model is not None else f"{saved.model} (saved logits)"
    if save_logits:
        write_logits(save_logits, kept, tokens, ctx=ctx, stride=stride or ctx, vocab=model.vocab_size, model=model.name,
                     force=force)
        result["saved_logits"] = str(save_logits)
    return result


def _check_vocab(vocab_size: int, tokens: list[int], source, tok) -> None:
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size or max(tokens) >= vocab_size:
        raise DsmoeError(f"{source}'s tokenizer.json has {tok.get_vocab_size(with_added_tokens=True)} tokens, more than "
                         f"the model's vocabulary of {vocab_size}")


def _check_output(path, *, force: bool, inputs) -> None:
    out = Path(path).resolve()
    for i in inputs:
        if i is not None and Path(i).resolve() == out:
            raise DsmoeError(f"--save-logits {path} is one of the command's inputs")
    if out.exists() and not force:
        raise DsmoeError(f"--save-logits {path} exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise DsmoeError(f"--save-logits {path}: directory {out.parent} does not exist")


class _bar:
    """A rich progress bar on stderr (windows done / total); a no-op when ``progress`` is False."""

    def __init__(self, progress: bool, total: int, name: str):
        self.progress, self.total, self.name = progress, total, name

    def __enter__(self):
        if not self.progress:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.p.__enter__()
        task = self.p.add_task(self.name, total=self.total)
        return lambda: self.p.advance(task)

    def __exit__(self, *exc):
        if self.progress:
            self.p.__exit__(*exc)
        return False
