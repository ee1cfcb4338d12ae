"""The decoding engine: one loop for ``dsmoe generate``, ``dsmoe serve`` and the benchmarks.

It drives any *step function* ``step(input_ids, attention_mask, position_ids, past) -> (logits,
present)`` (the eager model, the fused graph, :class:`dsmoe.export.OrtDecoder`) with an
iteration-level scheduler:

1. every iteration first decodes one token for **each running sequence** in one batched step;
2. then, within a budget of ``max_step_tokens`` tokens per iteration (minus the decode rows),
   it prefills waiting requests in FIFO order, each **alone** (batch 1, no padding) and in
   chunks when a prompt is longer than what is left of the budget (chunked prefill: the next
   chunk continues from the request's own cache at the next iteration); a request whose prompt
   is complete samples its first token and joins the running batch at the next step;
3. a finished, cancelled or failed sequence leaves the batch and frees its slot at the start of
   the next iteration.

**KV slots.** The running batch keeps one cache in the model's layout, ``[B, heads, P, dim]`` per
tensor, *right-aligned*: row b's newest token is always in the last column, older columns it
does not have are zeros with ``attention_mask`` 0. Each decode step appends one column to every
row (the model concatenates past and present), so decoding needs no copy; positions are per row
(``position_ids``), so a row's RoPE does not see the padding. A joining request's cache (from its
own prefill) is left-padded to the batch's width, or the batch is left-padded to it; a leaving
row is dropped and all-padding columns on the left are trimmed. Joins and leaves copy the cache
(``O(B·P)``, at most once per request each); decode steps do not. We chose this over the
static-cache export's preallocated buffers because it runs every backend (eager, fused, both
ONNX Runtime cache modes) through one signature, and masking makes each row compute what it
computes alone (padded slots get exactly zero attention weight); a static export still works (its
decoder copies the batch into its buffers when the history changes).

Limits: ``max_running`` sequences in the batch (the slots), ``max_step_tokens`` tokens per
iteration (decode rows + prefill chunk), ``max_model_len`` positions per sequence (prompt +
generated; a request asking for more is refused when added), ``max_waiting`` queued requests
(:class:`QueueFull` past it).

Thread use: :meth:`Engine.add` and :meth:`Engine.cancel` may be called from any thread;
:meth:`Engine.step` from one thread only (:class:`EngineThread` runs it in the background).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from dsmoe.app.sampling import SamplingParams, sample
from dsmoe.cache import cache_layout
from dsmoe.errors import DsmoeError


class QueueFull(DsmoeError):
    """The waiting queue is at ``max_waiting`` (a server answers 429)."""


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request in the engine. ``sink`` (optional) is told each token and the end:
    ``sink.token(seq, token, logprob, top) -> bool`` (True: a stop string matched, finish now) and
    ``sink.finish(seq)``; both run on the engine's thread."""

    prompt: list[int]
    params: SamplingParams
    sink: Any = None
    id: int = field(default_factory=lambda: next(_ids))
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None     # stop | length | cancelled | error
    error: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: bool = False
    prefilled: int = 0
    cache: list | None = None
    pos: int = 0
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """The scheduler and the batch's KV slots (module docstring). ``on_step(batch, prefill_tokens)``
    (optional) is called after each iteration that ran the model."""

    def __init__(self, step, config, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_running: int = 8, max_step_tokens: int = 512, max_model_len: int | None = None,
                 max_waiting: int = 256, on_step=None, views: bool | None = None):
        limit = config.max_position_embeddings
        self.max_model_len = max_model_len or limit
        if not 1 <= self.max_model_len <= limit:
            raise DsmoeError(f"--max-model-len must be in [1, {limit}] (the model's max_position_embeddings)")
        if max_running < 1 or max_step_tokens < max_running + 1 or max_waiting < 0:
            raise DsmoeError("--max-running must be >= 1 and the step budget larger than it")
        self.step_fn, self.config, self.dtype, self.device = step, config, dtype, torch.device(device)
        self.max_running, self.max_step_tokens, self.max_waiting = max_running, max_step_tokens, max_waiting
        self.layout = cache_layout(config)
        self.eos = set(config.eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.running: list[Sequence] = []
        self.cache: list | None = None       # the running batch's, right-aligned
        self.mask: torch.Tensor | None = None
        self.on_step = on_step
        # a step whose present is a view of buffers it reuses (``present_views``: a static-cache or
        # in-place OrtDecoder, the CUDA-graph StaticDecoder: "valid until the next call") gets the
        # cache we keep cloned before another call
        self.views = bool(getattr(step, "present_views", False)) if views is None else views
        self._fragile: object = None         # "batch" or the Sequence holding the last call's present
        self._lock = threading.Lock()
        self.wakeup = threading.Event()

    # ---- requests -------------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """One :class:`DsmoeError` if this request cannot run (a server answers 400)."""
        if not prompt:
            raise DsmoeError("the prompt is empty")
        bad = [i for i in prompt if not (isinstance(i, int) and 0 <= i < self.config.vocab_size)]
        if bad:
            raise DsmoeError(f"prompt id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        params.check(self.config.vocab_size)
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise DsmoeError(f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} exceed the context of "
                             f"{self.max_model_len} tokens; ask for at most {max(self.max_model_len - len(prompt), 0)}")

    def add(self, prompt: list[int], params: SamplingParams, sink=None) -> Sequence:
        self.check(prompt, params)
        seq = Sequence(list(prompt), params, sink)
        seq.generator = params.generator()
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} waiting requests); retry later")
            self.waiting.append(seq)
        self.wakeup.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the next iteration (its slot is freed then)."""
        seq.cancelled = True
        self.wakeup.set()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def counts(self) -> dict:
        """Running, waiting and KV slot use (for metrics)."""
        return {"running": len(self.running), "waiting": len(self.waiting) + (self.prefilling is not None),
                "slots": self.max_running, "cache_tokens": 0 if self.mask is None else int(self.mask.sum())}

    # ---- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: retire finished rows, decode the batch, prefill within the budget."""
        self._retire()
        batch = len(self.running)
        if batch:
            self._decode()
        budget, prefilled = self.max_step_tokens - batch, 0
        while budget > 0:
            seq = self.prefilling or self._next_waiting()
            if seq is None:
                break
            n = min(budget, len(seq.prompt) - seq.prefilled)
            self._prefill(seq, n)
            budget, prefilled = budget - n, prefilled + n
            if seq.prefilled < len(seq.prompt):
                self.prefilling = seq
                break
            self.prefilling = None
        if self.on_step is not None and (batch or prefilled):
            self.on_step(batch, prefilled)

    def run(self) -> None:
        """Step until every request is done (``dsmoe generate``)."""
        while self.has_work:
            self.step()
            self._retire()

    def fail_all(self, message: str) -> None:
        """The model call failed: every sequence in flight fails with ``message``; the batch is reset."""
        for seq in [*self.running, *([self.prefilling] if self.prefilling else [])]:
            if not seq.done:
                self._finish(seq, "error", message)
        self.running, self.prefilling, self.cache, self.mask, self._fragile = [], None, None, None, None

    def _next_waiting(self) -> Sequence | None:
        with self._lock:
            while self.waiting and len(self.running) < self.max_running:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                    continue
                return seq
        return None

    def _prefill(self, seq: Sequence, n: int) -> None:
        P = seq.prefilled
        ids = torch.tensor([seq.prompt[P:P + n]], dtype=torch.int64, device=self.device)
        mask = torch.ones(1, P + n, dtype=torch.int64, device=self.device)
        pos = torch.arange(P, P + n, dtype=torch.int64, device=self.device).unsqueeze(0)
        self._protect(seq)
        past = seq.cache if seq.cache is not None else self.layout.empty(1, self.dtype, self.device)
        logits, present = self.step_fn(ids, mask, pos, list(past))
        seq.cache, seq.prefilled, seq.pos = present, P + n, P + n
        self._fragile = seq
        if seq.prefilled == len(seq.prompt):
            self._emit([seq], torch.as_tensor(logits)[:, -1])
            if seq.done:
                seq.cache = None
            else:
                self._join(seq)

    def _decode(self) -> None:
        rows = self.running
        B = len(rows)
        ids = torch.tensor([[s.out[-1]] for s in rows], dtype=torch.int64, device=self.device)
        pos = torch.tensor([[s.pos] for s in rows], dtype=torch.int64, device=self.device)
        mask = torch.cat([self.mask, torch.ones(B, 1, dtype=torch.int64, device=self.device)], dim=1)
        self._protect("batch")
        logits, present = self.step_fn(ids, mask, pos, list(self.cache))
        self.cache, self.mask = present, mask
        self._fragile = "batch"
        for s in rows:
            s.pos += 1
        self._emit(rows, torch.as_tensor(logits)[:, -1])

    def _emit(self, seqs: list[Sequence], last: torch.Tensor) -> None:
        """Sample each sequence's next token from ``last [B, V]``; a row whose logits are not finite
        fails alone."""
        last = last.float().cpu()
        finite = torch.isfinite(last).all(dim=-1).tolist()
        ok = [b for b, f in enumerate(finite) if f]
        for b, f in enumerate(finite):
            if not f and not seqs[b].done:
                self._finish(seqs[b], "error", f"the model's logits are not finite (NaN/Inf) at step "
                             f"{len(seqs[b].out) + 1}: no token can be chosen")
        if not ok:
            return
        choice = sample(last[ok], [seqs[b].params for b in ok], [seqs[b].generator for b in ok],
                        [seqs[b].out for b in ok])
        now = time.perf_counter()
        for j, b in enumerate(ok):
            seq, tok, p = seqs[b], choice.tokens[j], seqs[b].params
            if seq.done:
                continue
            seq.out.append(tok)
            seq.first_token_at = seq.first_token_at or now
            stopped = (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids
            if not stopped and seq.sink is not None:
                stopped = bool(seq.sink.token(seq, tok, choice.logprobs[j], choice.top[j]))
            reason = "stop" if stopped else None
            if reason is None and (len(seq.out) >= p.max_tokens or len(seq.prompt) + len(seq.out) >= self.max_model_len):
                reason = "length"
            if reason is None and seq.cancelled:
                reason = "cancelled"
            if reason:
                self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason, seq.error = reason, error
        if seq.sink is not None:
            seq.sink.finish(seq)

    def _join(self, seq: Sequence) -> None:
        L = seq.cache[0][0].shape[2]
        new_mask = torch.ones(1, L, dtype=torch.int64, device=self.device)
        if not self.running:
            self.cache, self.mask, self.running = seq.cache, new_mask, [seq]
            seq.cache = None
            if self._fragile is seq:
                self._fragile = "batch"
            return
        P = self.mask.shape[1]
        W = max(P, L)
        old = [tuple(_left_pad(t, W) for t in layer) for layer in self.cache]
        new = [tuple(_left_pad(t, W) for t in layer) for layer in seq.cache]
        self.cache = [tuple(torch.cat([a, b]) for a, b in zip(la, lb)) for la, lb in zip(old, new)]
        self.mask = torch.cat([_left_pad(self.mask, W), _left_pad(new_mask, W)])
        self.running.append(seq)
        seq.cache = None
        self._fragile = None if self._fragile in ("batch", seq) else self._fragile

    def _retire(self) -> None:
        """Drop finished or cancelled rows; trim the all-padding columns on the left."""
        for s in self.running:
            if s.cancelled and not s.done:
                self._finish(s, "cancelled")
        if self.prefilling is not None and self.prefilling.cancelled:
            self._finish(self.prefilling, "cancelled")
            self.prefilling = None
        keep = [b for b, s in enumerate(self.running) if not s.done]
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self.cache, self.mask = [], None, None
            self._fragile = None if self._fragile == "batch" else self._fragile
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, idx)
        lead = int((mask.cumsum(1) == 0).sum(1).min())
        self.mask = mask[:, lead:]
        self.cache = [tuple(t.index_select(0, idx)[:, :, lead:] for t in layer) for layer in self.cache]
        self.running = [self.running[b] for b in keep]
        if self._fragile == "batch":
            self._fragile = None

    def _protect(self, owner) -> None:
        """Before a model call whose past is ``owner``'s: clone the last call's present if someone
        else still holds it and the step reuses its buffers (``views``)."""
        f = self._fragile
        if not self.views or f is None or f is owner:
            return
        if f == "batch" and self.cache is not None:
            self.cache = [tuple(t.clone() for t in layer) for layer in self.cache]
        elif isinstance(f, Sequence) and f.cache is not None:
            f.cache = [tuple(t.clone() for t in layer) for layer in f.cache]
        self._fragile = None


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with zero columns on the left of its time axis (2 for the cache, 1 for the mask)."""
    axis = 2 if t.dim() == 4 else 1
    n = width - t.shape[axis]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[axis] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=axis)


class EngineThread:
    """Runs :meth:`Engine.step` in a background thread while there is work; a model failure fails
    the sequences in flight (``fail_all``) and the loop goes on."""

    def __init__(self, engine: Engine):
        self.engine, self._stop = engine, False
        self.thread = threading.Thread(target=self._loop, name="dsmoe-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.engine.wakeup.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            if not eng.has_work:
                eng.wakeup.wait(0.5)
                eng.wakeup.clear()
                continue
            try:
                eng.step()
            except Exception as e:  # a backend error: the requests in flight fail, the server goes on
                eng.fail_all(f"the model failed: {str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}")
