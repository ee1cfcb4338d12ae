"""Choosing the next token of every running sequence at once: one vectorized pass over the batch's
logits ``[B, V]`` (B sequences, V vocabulary).

Order of operations (OpenAI's definitions): presence/frequency penalties on the raw logits
(``logit[v] -= frequency·count[v] + presence·[count[v] > 0]``, counting the tokens this request
generated); ``logprobs`` are read here (log-softmax of the penalized logits, before temperature);
then a row at temperature 0 takes the argmax, and a sampled row divides by its temperature, keeps
its top-k and its top-p nucleus, and draws one uniform number from **its own**
``torch.Generator`` (seeded per request) to pick from the cumulative distribution. One draw per
step per request, from a generator no other request touches, makes a seeded request's tokens the
same whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsmoe.errors import DsmoeError


@dataclass
class SamplingParams:
    """One request's decoding parameters (validated by :meth:`check`)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0

    def check(self, vocab_size: int) -> None:
        """One :class:`DsmoeError` naming the first value out of range."""
        import math
        rules = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and 0 <= self.temperature <= 100, "temperature must be in [0, 100]"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0: off)"),
            (math.isfinite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (math.isfinite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "frequency_penalty must be in [-2, 2]"),
            (0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
            (all(0 <= t < vocab_size for t in self.stop_token_ids), f"stop_token_ids must lie in [0, {vocab_size})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (len(self.stop) <= 4, "at most 4 stop strings"),
        ]
        for ok, message in rules:
            if not ok:
                raise DsmoeError(message)

    def generator(self) -> torch.Generator | None:
        """The request's own generator (sampled requests only); unseeded requests get a random seed."""
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


@dataclass
class Choice:
    """What :func:`sample` returns: per row the token, and (when asked) its logprob and the top ones."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           history: list[list[int]]) -> Choice:
    """The next token of each row of ``logits [B, V]`` (finite rows only: the caller checks).
    ``history[b]``: the tokens row b generated so far (for the penalties)."""
    B, V = logits.shape
    x = logits.float()
    pres = torch.tensor([p.presence_penalty for p in params])
    freq = torch.tensor([p.frequency_penalty for p in params])
    if bool((pres != 0).any() or (freq != 0).any()):
        counts = torch.zeros(B, V)
        for b, h in enumerate(history):
            if h:
                counts[b].index_add_(0, torch.tensor(h), torch.ones(len(h)))
        x = x - freq[:, None] * counts - pres[:, None] * (counts > 0).float()
    want_lp = any(p.logprobs or p.top_logprobs for p in params)
    lp = torch.log_softmax(x, dim=-1) if want_lp else None
    temp = torch.tensor([p.temperature for p in params])
    greedy = temp == 0
    tokens = x.argmax(dim=-1)
    if not bool(greedy.all()):
        rows = (~greedy).nonzero().flatten()
        y = x[rows] / temp[rows, None]
        ks = torch.tensor([params[int(r)].top_k for r in rows])
        if bool((ks > 0).any()):
            k = torch.where(ks > 0, ks.clamp(max=V), torch.full_like(ks, V))
            kth = torch.sort(y, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            y = y.masked_fill(y < kth, float("-inf"))
        probs = torch.softmax(y, dim=-1)
        ps = torch.tensor([params[int(r)].top_p for r in rows])
        if bool((ps < 1).any()):
            sp, order = torch.sort(probs, dim=-1, descending=True)
            before = sp.cumsum(-1) - sp                 # mass strictly above each token
            drop_sorted = before >= ps[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        cdf = probs.double().cumsum(-1)
        u = torch.stack([torch.rand((), generator=generators[int(r)], dtype=torch.float64) for r in rows])
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).flatten().clamp(max=V - 1)
        # a zero-probability token can only be hit at the edge: step back to the nearest kept one
        zero = probs.gather(1, picked[:, None]).flatten() == 0
        if bool(zero.any()):
            for j in zero.nonzero().flatten().tolist():
                kept = (probs[j] > 0).nonzero().flatten()
                picked[j] = kept[torch.searchsorted(kept, picked[j]).clamp(max=kept.numel() - 1)]
        tokens[rows] = picked
    out = tokens.tolist()
    logprobs: list[float | None] = [None] * B
    top: list[list[tuple[int, float]] | None] = [None] * B
    if lp is not None:
        for b, p in enumerate(params):
            if p.logprobs or p.top_logprobs:
                logprobs[b] = float(lp[b, out[b]])
            if p.top_logprobs:
                v, i = lp[b].topk(p.top_logprobs)
                top[b] = list(zip(i.tolist(), v.tolist()))
    return Choice(out, logprobs, top)
