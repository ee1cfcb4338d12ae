"""Perplexity and KL-divergence statistics over scored tokens (llama.cpp's ``llama-perplexity`` set).

Per scored token: the negative log-likelihood of the true next token, and against a baseline the
KL divergence ``KL(P_base ‖ P_model) = Σ_v p_base(v)·(log p_base(v) − log p_model(v))``, whether
both put the same token on top, and ``Δp = p_model(true) − p_base(true)``.
"""

from __future__ import annotations

import math

import numpy as np

PERCENTILES = (99.9, 99.0, 90.0, 50.0, 10.0, 1.0, 0.1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Scores:
    """Per-token values gathered window by window; :meth:`summary` turns them into the report."""

    def __init__(self):
        self.nll: list[np.ndarray] = []
        self.base_nll: list[np.ndarray] = []
        self.kld: list[np.ndarray] = []
        self.same_top: list[np.ndarray] = []
        self.dp: list[np.ndarray] = []
        self.bytes = 0

    def add(self, logp: np.ndarray, targets: np.ndarray, nbytes: int, base_logp: np.ndarray | None = None) -> None:
        """``logp [n, V]`` log-probabilities of the scored positions, ``targets [n]`` the true next tokens."""
        rows = np.arange(len(targets))
        self.nll.append(-logp[rows, targets])
        self.bytes += nbytes
        if base_logp is None:
            return
        base_logp = base_logp.astype(np.float64)
        p_base = np.exp(base_logp)
        self.kld.append(np.maximum((p_base * (base_logp - logp)).sum(axis=-1), 0.0))
        self.base_nll.append(-base_logp[rows, targets])
        self.same_top.append(logp.argmax(-1) == base_logp.argmax(-1))
        self.dp.append(np.exp(logp[rows, targets]) - p_base[rows, targets])

    @property
    def count(self) -> int:
        return int(sum(len(a) for a in self.nll))

    def summary(self) -> dict:
        nll = np.concatenate(self.nll)
        n = len(nll)
        mean = float(nll.mean())
        out = {"tokens": n, "bytes": self.bytes, "nll": mean, "ppl": math.exp(mean),
               "ppl_stderr": math.exp(mean) * float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
               "bits_per_byte": float(nll.sum()) / math.log(2) / self.bytes if self.bytes else None}
        if not self.kld:
            return out
        kld, base = np.concatenate(self.kld), np.concatenate(self.base_nll)
        dp, same = np.concatenate(self.dp), np.concatenate(self.same_top)
        base_mean = float(base.mean())
        out["baseline"] = {
            "ppl": math.exp(base_mean), "bits_per_byte": float(base.sum()) / math.log(2) / self.bytes if self.bytes else None,
            "ppl_ratio": math.exp(mean - base_mean), "ln_ppl_ratio": mean - base_mean,
            "kld_mean": float(kld.mean()), "kld_stderr": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "kld_max": float(kld.max()), "kld_min": float(kld.min()),
            "kld_percentiles": {f"{q:g}": float(np.percentile(kld, q)) for q in PERCENTILES},
            "same_top1": float(same.mean()), "dp_mean": float(dp.mean()), "dp_rms": float(np.sqrt((dp ** 2).mean())),
        }
        return out
