"""The bridge between the engine's thread and one HTTP request: :class:`Sink` receives tokens on
the engine thread (detokenizing there, so a stop string ends the sequence at once) and hands
events to the request's asyncio task; it also records the request's latency metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time

from dsmoe.app.text import Detokenizer


class Sink:
    def __init__(self, loop: asyncio.AbstractEventLoop, text, stop: tuple[str, ...], metrics):
        self.loop, self.text, self.metrics = loop, text, metrics
        self.q: asyncio.Queue = asyncio.Queue()
        self.detok = Detokenizer(text, stop) if text.tokenizer is not None else None
        self.seen: list[int] = []
        self.last: float | None = None
        self.seq = None

    # ---- engine thread ----------------------------------------------------------------------------
    def token(self, seq, tok: int, logprob, top) -> bool:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.seen.append(tok)
        delta = self.detok.add(tok) if self.detok is not None else ""
        self._put("token", {"id": tok, "text": delta, "logprob": logprob, "top": top})
        return self.detok is not None and self.detok.stopped

    def finish(self, seq) -> None:
        ok = seq.finish_reason in ("stop", "length")
        rest = self.detok.flush() if self.detok is not None and ok else ""
        m = self.metrics
        m.generated_tokens.inc(len(seq.out))
        if self.last is None and seq.first_token_at is not None:
            m.ttft.observe(seq.first_token_at - seq.arrival)
        m.e2e.observe(time.perf_counter() - seq.arrival)
        m.requests.labels(outcome=seq.finish_reason).inc()
        self._put("finish", {"text": rest, "seen": list(self.seen)})

    def _put(self, kind: str, ev: dict) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed (the server stopped)
            self.loop.call_soon_threadsafe(self.q.put_nowait, (kind, ev))

    # ---- the request's task -----------------------------------------------------------------------
    async def events(self, request):
        """``(kind, event)`` until the sequence finishes; a client that went away cancels it."""
        checked = time.perf_counter()
        while True:
            try:
                kind, ev = await asyncio.wait_for(self.q.get(), 0.25)
            except TimeoutError:
                kind = ev = None
            now = time.perf_counter()
            if kind != "finish" and (kind is None or now - checked > 0.1):
                checked = now
                if await request.is_disconnected():
                    self.seq.cancelled = True
                    return
            if kind is None:
                continue
            yield kind, ev
            if kind == "finish":
                return


def token_str(text, tok: int) -> str:
    return text.decode([tok]) if text.tokenizer is not None else f"token_id:{tok}"


def completion_logprobs(steps: list[dict], text) -> dict:
    """The legacy completions ``logprobs`` object over token events."""
    tokens = [token_str(text, e["id"]) for e in steps]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in steps],
            "top_logprobs": [{token_str(text, i): lp for i, lp in (e["top"] or [])} for e in steps],
            "text_offset": offsets}


def chat_logprobs(steps: list[dict], text) -> dict:
    """The chat ``logprobs`` object (``content``: one entry per token) over token events."""
    def entry(i, lp):
        s = token_str(text, i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**entry(e["id"], e["logprob"]), "top_logprobs": [entry(i, lp) for i, lp in (e["top"] or [])]}
                        for e in steps]}
