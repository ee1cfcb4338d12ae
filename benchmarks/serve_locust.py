"""The locustfile of ``dsmoe bench --suite serve`` (run by locust, not imported by dsmoe): each
user sends streamed greedy completions of random token-id prompts to an OpenAI-compatible
``/v1/completions`` (dsmoe serve or llama.cpp's llama-server) and reports, as locust events,
``ttft`` (request to first token), ``tpot`` (mean time per output token after the first, from the
``usage`` chunk's count) and ``token`` (one event per streamed token chunk, so tokens of requests
still running when the run stops count too). Settings come
from the environment: BENCH_MODEL, BENCH_PROMPT_LEN, BENCH_MAX_TOKENS, BENCH_VOCAB, BENCH_SEED."""

import itertools
import json
import os
import random
import time

from locust import HttpUser, constant, task

MODEL = os.environ.get("BENCH_MODEL", "model")
PROMPT_LEN = int(os.environ.get("BENCH_PROMPT_LEN", "128"))
MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "64"))
VOCAB = int(os.environ.get("BENCH_VOCAB", "16384"))
_users = itertools.count()


class Completions(HttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.rng = random.Random(int(os.environ.get("BENCH_SEED", "0")) * 1000 + next(_users))

    @task
    def complete(self):
        body = {"model": MODEL, "prompt": [self.rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)],
                "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        fire = self.environment.events.request.fire
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True, name="completion") as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
                return
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                now = time.perf_counter()
                if doc.get("choices"):
                    c = doc["choices"][0]
                    if c.get("finish_reason") is None:  # a token's chunk (both servers stream one token per chunk)
                        fire(request_type="metric", name="token", response_time=0, response_length=1, exception=None)
                    first = first or now
                    last = now
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
            if first is None or tokens == 0:
                r.failure("no tokens")
                return
        fire(request_type="metric", name="ttft", response_time=(first - t0) * 1000, response_length=0, exception=None)
        if tokens > 1:
            fire(request_type="metric", name="tpot", response_time=(last - first) * 1000 / (tokens - 1),
                 response_length=0, exception=None)
