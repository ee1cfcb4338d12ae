"""``dsmoe serve``'s Prometheus metrics (``prometheus-client``, one registry per server) and the
live expert load.

Request metrics: requests by outcome, running/waiting sequences, KV slots in use, prompt and
generated tokens, time to first token, inter-token latency, end-to-end latency, batch size per
step. Expert load (:class:`ExpertLoad`): the routers' choices of every model call, counted per MoE
layer — cumulative routed slots per layer, and over a sliding window of the last ``window_s``
seconds the max/mean imbalance and the number of never-chosen experts; per-expert series
(``dsmoe_expert_tokens_total{layer,expert}``) only with ``per_expert`` (bounded label cardinality
by default: one series per layer). The JSON report (:meth:`ExpertLoad.report`) is ``dsmoe
experts``' report (:func:`dsmoe.app.expert_stats.expert_report`) over the last ``keep_tokens``
routed tokens, with its placement for N devices.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsmoe.app.expert_stats import RouterTrace, expert_report

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self, engine, expert_load: ExpertLoad | None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsmoe_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("dsmoe_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("dsmoe_generated_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("dsmoe_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY, registry=r)
        self.itl = Histogram("dsmoe_inter_token_latency_seconds", "between consecutive tokens of a request",
                             buckets=LATENCY, registry=r)
        self.e2e = Histogram("dsmoe_e2e_latency_seconds", "arrival to finish", buckets=LATENCY, registry=r)
        self.batch = Histogram("dsmoe_batch_size", "running sequences decoded per step", buckets=BATCH, registry=r)
        self.prefill = Counter("dsmoe_prefill_tokens", "prompt tokens prefilled", registry=r)
        for name, doc, key in (("dsmoe_running", "sequences in the running batch", "running"),
                               ("dsmoe_waiting", "requests waiting for a slot (or prefilling)", "waiting"),
                               ("dsmoe_kv_slots_used", "KV slots in use (running sequences)", "running"),
                               ("dsmoe_kv_slots", "KV slots (--max-running)", "slots"),
                               ("dsmoe_kv_cache_tokens", "cached tokens of the running batch", "cache_tokens")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: engine.counts()[key])
        if expert_load is not None:
            r.register(expert_load)

    def on_step(self, batch: int, prefilled: int) -> None:
        if batch:
            self.batch.observe(batch)
        if prefilled:
            self.prefill.inc(prefilled)


class ExpertLoad:
    """Routed-token counts per MoE layer, fed with each model call's router values (engine thread),
    read by Prometheus scrapes and the JSON report (HTTP thread)."""

    def __init__(self, config, *, window_s: float = 60.0, per_expert: bool = False, keep_tokens: int = 4096):
        self.E, self.K = config.n_routed_experts, config.num_experts_per_tok
        self.has_shared = bool(config.n_shared_experts)
        self.window_s, self.per_expert, self.keep_tokens = window_s, per_expert, keep_tokens
        self.totals: dict[int, torch.Tensor] = {}
        self.window: deque[tuple[float, dict[int, torch.Tensor]]] = deque()
        self.recent: deque[tuple[int, dict]] = deque()   # (tokens, router) of the last calls
        self.recent_tokens = 0
        self.lock = threading.Lock()

    def add(self, router: dict) -> None:
        now = time.monotonic()
        counts = {layer: torch.bincount(f["ids"].reshape(-1).long(), minlength=self.E) for layer, f in router.items()}
        T = next(iter(router.values()))["ids"].shape[0] if router else 0
        with self.lock:
            for layer, c in counts.items():
                self.totals[layer] = self.totals.get(layer, torch.zeros(self.E, dtype=torch.int64)) + c
            self.window.append((now, counts))
            self._expire(now)
            self.recent.append((T, {layer: {k: v.detach().cpu() for k, v in f.items()} for layer, f in router.items()}))
            self.recent_tokens += T
            while self.recent and self.recent_tokens - self.recent[0][0] >= self.keep_tokens:
                self.recent_tokens -= self.recent.popleft()[0]

    def _expire(self, now: float) -> None:
        while self.window and now - self.window[0][0] > self.window_s:
            self.window.popleft()

    def windowed(self) -> dict[int, torch.Tensor]:
        with self.lock:
            self._expire(time.monotonic())
            out: dict[int, torch.Tensor] = {}
            for _, counts in self.window:
                for layer, c in counts.items():
                    out[layer] = out.get(layer, torch.zeros(self.E, dtype=torch.int64)) + c
            return out

    def collect(self):
        with self.lock:
            totals = {k: v.clone() for k, v in self.totals.items()}
        win = self.windowed()
        routed = CounterMetricFamily("dsmoe_expert_routed_slots", "routed (token, expert) choices per MoE layer",
                                     labels=["layer"])
        imb = GaugeMetricFamily("dsmoe_expert_imbalance", f"max/mean routed count over the last {self.window_s:g} s "
                                "(1 = balanced; NaN before any traffic)", labels=["layer"])
        never = GaugeMetricFamily("dsmoe_expert_never_chosen", f"experts no token chose in the last {self.window_s:g} s",
                                  labels=["layer"])
        per = CounterMetricFamily("dsmoe_expert_tokens", "tokens routed to each expert", labels=["layer", "expert"])
        for layer in sorted(totals):
            routed.add_metric([str(layer)], float(totals[layer].sum()))
            c = win.get(layer)
            mean = float(c.sum()) / self.E if c is not None else 0.0
            imb.add_metric([str(layer)], float(c.max()) / mean if mean > 0 else float("nan"))
            never.add_metric([str(layer)], float((c == 0).sum()) if c is not None else float(self.E))
            if self.per_expert:
                for e, v in enumerate(totals[layer].tolist()):
                    per.add_metric([str(layer), str(e)], float(v))
        yield from (routed, imb, never) + ((per,) if self.per_expert else ())

    def report(self, *, devices: int | None = None, top_pairs: int = 5) -> dict:
        """``dsmoe experts``' report over the last routed tokens (and its placement on ``devices``)."""
        from dsmoe.app.placement import placement_report

        trace = RouterTrace()
        with self.lock:
            for _, router in self.recent:
                trace.add(router)
            totals = {layer: c.tolist() for layer, c in self.totals.items()}
        doc = expert_report(trace, num_experts=self.E, top_k=self.K, has_shared=self.has_shared, top_pairs=top_pairs)
        doc["window_tokens"] = doc["tokens"]
        doc["total_counts"] = {str(k): v for k, v in sorted(totals.items())}
        if devices:
            doc["placement"] = placement_report(doc, devices)
        return doc


def counting(router_step, load: ExpertLoad):
    """A plain step function over a router step that feeds every call's choices to ``load`` (the
    engine sends real tokens only: prefill alone, decode rows one real token each)."""
    def step(input_ids, attention_mask, position_ids, past):
        logits, present, router = router_step(input_ids, attention_mask, position_ids, past)
        load.add(router)
        return logits, present
    return step
