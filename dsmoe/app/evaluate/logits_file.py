"""Saved baseline logits: one safetensors file, never a pickle.

``logprobs`` — fp16 log-softmax of every scored position ``[n, V]`` (half of fp32; the KLD it gives
differs from the live baseline's by ~1e-6, measured in the tests); ``tokens`` — int32, the whole
tokenized text (a later run must tokenize to exactly these); metadata: format, ctx, stride, vocab
size and the model's name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from dsmoe.errors import DsmoeError

FORMAT = "dsmoe-eval-logits/1"


def save_logits(path: str | Path, logprobs: list[np.ndarray], tokens: list[int], *, ctx: int, stride: int,
                vocab: int, model: str, force: bool = False) -> None:
    """Write atomically (temp file in the same directory, then ``os.replace``); refuse an existing file unless ``force``."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not force:
        raise DsmoeError(f"{path} exists (use --force to replace it)")
    tensors = {"logprobs": np.concatenate(logprobs).astype(np.float16), "tokens": np.asarray(tokens, dtype=np.int32)}
    meta = {"format": FORMAT, "ctx": str(ctx), "stride": str(stride), "vocab": str(vocab), "model": model}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SavedLogits:
    """A saved baseline, checked against the run that reuses it (same tokens, ctx, stride, vocab)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise DsmoeError(f"--baseline-logits {path} does not exist")
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise DsmoeError(f"{path} is not a dsmoe eval logits file (format {meta.get('format')!r})")
                self.logprobs = f.get_tensor("logprobs")
                self.tokens = f.get_tensor("tokens")
        except DsmoeError:
            raise
        except Exception as e:  # safetensors raises its own errors for a damaged file
            raise DsmoeError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
        self.ctx, self.stride, self.vocab = int(meta["ctx"]), int(meta["stride"]), int(meta["vocab"])
        self.model = meta.get("model", "?")
        self.offset = 0

    def check(self, tokens: list[int], *, ctx: int, stride: int, vocab: int) -> None:
        if self.vocab != vocab:
            raise DsmoeError(f"the baseline logits {self.path} have a vocabulary of {self.vocab}, the model {vocab}")
        if (self.ctx, self.stride) != (ctx, stride):
            raise DsmoeError(f"the baseline logits {self.path} were scored with --ctx {self.ctx} --stride {self.stride}, "
                             f"this run uses --ctx {ctx} --stride {stride}")
        if len(self.tokens) != len(tokens) or not np.array_equal(self.tokens, np.asarray(tokens, dtype=np.int32)):
            raise DsmoeError(f"the baseline logits {self.path} were scored on other text (its {len(self.tokens)} tokens "
                             f"differ from these {len(tokens)})")

    def next(self, n: int) -> np.ndarray:
        out = self.logprobs[self.offset:self.offset + n].astype(np.float64)
        self.offset += n
        return out - np.log(np.exp(out).sum(axis=-1, keepdims=True))  # renormalize after fp16 rounding
