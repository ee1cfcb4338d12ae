"""``dsmoe serve`` as a user runs it: one real server process on a free loopback port (module
scope) over a tiny ONNX Runtime export with router outputs, a byte-level tokenizer and a chat
template; driven by the official ``openai`` client and by raw HTTP for what a client library
would not send. ``dsmoe generate`` (in-process, same export) is the alone/greedy reference and
its ``--router-stats`` counts the reference for the expert metrics."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import dsmoe
from dsmoe.checkpoint import save_checkpoint

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

KEY = "test-key"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = [[1, 5, 9, 17, 33, 40, 41], [7, 8, 100], [3, 200, 11, 12, 13, 14, 15, 16, 17], [250, 4]]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsmoe.export import export_model
    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "tiny"
    save_checkpoint(dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2, "max_position_embeddings": 4096}), ckpt)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox"], trainers.BpeTrainer(
        vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE,
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))
    out = root / "tiny-ort"
    export_model(str(ckpt), out=str(out), router_stats=True)
    return out


class Server:
    def __init__(self, export: Path, log: Path, *args: str):
        self.log = log
        cmd = [sys.executable, "-c", "from dsmoe.app.cli import main; main()", "serve", str(export), "--port", "0",
               "--api-key", KEY, "--served-model-name", "tiny", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        deadline = time.monotonic() + 120
        while "/v1" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()}")
            time.sleep(0.1)
        self.port = int(log.read_text().split("http://127.0.0.1:")[1].split("/")[0])
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | (headers or {})
        conn.request(method, path, body=data, headers={k: v for k, v in h.items() if v is not None})
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text

    def metrics(self) -> dict:
        """``{(name, frozenset(labels)): value}`` parsed by prometheus_client's own parser."""
        _, text = self.request("GET", "/metrics")
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    s = Server(export, tmp_path_factory.mktemp("log") / "serve.log", "--max-running", "4", "--max-waiting", "16",
               "--max-step-tokens", "8", "--expert-stats", "per-expert", "--max-body", "65536")
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def generate(export, prompt, n: int) -> list[int]:
    from dsmoe.app.generate import run_generate
    ids, _ = run_generate(source=str(export), prompt_ids=" ".join(map(str, prompt)), max_new_tokens=n, backend="ort")
    return ids[0]


def greedy(client, prompt, n: int, **kw):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True}, **kw)


def test_models_auth_and_greedy_equals_generate(server, client, export):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = greedy(client, PROMPTS[0], 10)
    assert r.choices[0].token_ids == generate(export, PROMPTS[0], 10)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 10, 17)
    from dsmoe.app.generate import run_generate
    ids, text = run_generate(source=str(export), prompt="the quick", max_new_tokens=8, backend="ort")
    r = greedy(client, "the quick", 8)
    assert r.choices[0].token_ids == ids[0] and r.choices[0].text == text


def test_chat_streaming_and_not_with_usage(server, client, export):
    from transformers import PreTrainedTokenizerFast
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    hf = PreTrainedTokenizerFast(tokenizer_file=str(export / "tokenizer.json"))
    want = hf.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert r.usage.prompt_tokens == len(want) and r.usage.completion_tokens == 12
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert sum(len(c.choices[0].token_ids) for c in chunks if c.choices) == 12


def test_batched_equals_alone(server, client, export):
    """An anchor request is decoding when four more of different lengths join at different steps
    (two streamed): each gets exactly its tokens alone."""
    lengths = [300, 14, 6, 11]
    alone = [generate(export, p, n) for p, n in zip(PROMPTS, lengths)]
    before = server.metrics()
    anchor = greedy(client, PROMPTS[0], lengths[0], stream=True)
    first = next(iter(anchor))

    def one(i):
        time.sleep(0.01 * i)  # joining at different steps
        if i == 0:
            return first.choices[0].token_ids + [t for c in anchor for t in c.choices[0].token_ids]
        if i % 2:
            chunks = list(greedy(client, PROMPTS[i], lengths[i], stream=True))
            return [t for c in chunks for t in c.choices[0].token_ids]
        return greedy(client, PROMPTS[i], lengths[i]).choices[0].token_ids

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, [1, 2, 3, 0]))
    assert got == alone[1:] + alone[:1]
    after = server.metrics()
    steps = after[("dsmoe_batch_size_count", frozenset())] - before[("dsmoe_batch_size_count", frozenset())]
    single = (after[("dsmoe_batch_size_bucket", frozenset({("le", "1.0")}))]
              - before[("dsmoe_batch_size_bucket", frozenset({("le", "1.0")}))])
    assert single < steps  # some steps decoded several requests together


def test_seeded_sampling_is_reproducible_and_independent_of_concurrency(client):
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0.8, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True, "top_k": 40})
    a = client.completions.create(**kw).choices[0].token_ids
    b = client.completions.create(**kw).choices[0].token_ids

    def noise(i):
        return client.completions.create(model="tiny", prompt=PROMPTS[i % 4], max_tokens=10, temperature=1.0,
                                         seed=100 + i, extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(noise, i) for i in range(3)]
        c = pool.submit(lambda: client.completions.create(**kw)).result().choices[0].token_ids
        [o.result() for o in others]
    d = client.completions.create(**{**kw, "seed": 8}).choices[0].token_ids
    assert a == b == c and d != a


def test_stop_strings_streamed_and_not(client):
    full = greedy(client, "the quick", 24).choices[0].text
    at = next(i for i in range(2, len(full) - 1) if "\ufffd" not in full[i:i + 2] and full.find(full[i:i + 2]) == i)
    stop = full[at:at + 2]
    r = greedy(client, "the quick", 24, stop=[stop])
    assert r.choices[0].text == full[:at] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    chunks = list(greedy(client, "the quick", 24, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"


BAD = [  # (body or raw bytes, extra headers, status, words in the message)
    (b"{not json", {}, 400, "valid JSON"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": "many"}, {}, 400, "max_tokens"),
    ({"model": "other", "prompt": [1, 2]}, {}, 404, "does not exist"),
    ({"model": "tiny", "prompt": [1, 2], "n": 2}, {}, 400, "n > 1"),
    ({"model": "tiny", "prompt": [1, 2], "temperature": -1}, {}, 400, "temperature"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": 9000}, {}, 400, "context"),
    ({"model": "tiny", "prompt": [1, 2], "frobnicate": 1}, {}, 400, "frobnicate"),
    ({"model": "tiny", "prompt": [1, 999]}, {}, 400, "vocabulary"),
    ({"model": "tiny", "prompt": [1, 2]}, {"Authorization": None}, 401, "API key"),
    ({"model": "tiny", "prompt": "x" * 70000}, {}, 413, "limit"),
    ({"model": "tiny", "messages": []}, {}, 400, "messages"),
]


@pytest.mark.parametrize("body,headers,status,words", BAD, ids=[f"{b[2]}-{b[3]}" for b in BAD])
def test_bad_requests_get_openai_errors(server, body, headers, status, words):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    code, doc = server.request("POST", path, body, headers)
    assert code == status, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"} and words in doc["error"]["message"]
    assert server.request("GET", "/health")[0] == 200


def test_a_full_queue_answers_429_and_serves_the_rest(server):
    def one(_):
        return server.request("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 150,
                                                          "temperature": 0, "ignore_eos": True})
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    codes = [c for c, _ in results]
    assert 429 in codes and set(codes) <= {200, 429}
    assert all(d["usage"]["completion_tokens"] == 150 for c, d in results if c == 200)
    assert all(d["error"]["type"] == "rate_limit_error" for c, d in results if c == 429)


def _wait_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m[("dsmoe_running", frozenset())] == 0 and m[("dsmoe_waiting", frozenset())] == 0:
            return m
        assert time.monotonic() < deadline, "the server never went idle"
        time.sleep(0.1)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    before = _wait_idle(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4000,
                                                              "stream": True, "ignore_eos": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(6) == b"data: "
    conn.sock.shutdown(2)
    conn.close()
    after = _wait_idle(server)
    key = ("dsmoe_requests_total", frozenset({("outcome", "cancelled")}))
    assert after.get(key, 0) == before.get(key, 0) + 1, {k: v - before.get(k, 0) for k, v in after.items()
                                                          if k[0] in ("dsmoe_requests_total", "dsmoe_generated_tokens_total")}
    assert after[("dsmoe_generated_tokens_total", frozenset())] - before[("dsmoe_generated_tokens_total", frozenset())] < 4000
    assert len(greedy(client, PROMPTS[1], 3).choices[0].token_ids) == 3


def test_metrics_expert_counts_equal_router_stats(server, client, export):
    from dsmoe.app.experts import generate_with_stats
    _, _, report = generate_with_stats(source=str(export), prompt_ids="3 200 11 12 13", max_new_tokens=6, backend="ort")
    before = _wait_idle(server)
    greedy(client, [3, 200, 11, 12, 13], 6)
    after = _wait_idle(server)
    for layer in report["layers"]:
        got = [after[("dsmoe_expert_tokens_total", frozenset({("layer", str(layer["layer"])), ("expert", str(e))}))]
               - before.get(("dsmoe_expert_tokens_total", frozenset({("layer", str(layer["layer"])), ("expert", str(e))})), 0)
               for e in range(len(layer["counts"]))]
        assert got == layer["counts"]
    assert ("dsmoe_expert_imbalance", frozenset({("layer", "1")})) in after
    code, doc = server.request("GET", "/v1/experts?devices=2")
    assert code == 200 and doc["placement"]["devices"] == 2 and [s["layer"] for s in doc["layers"]] == [1]


def test_bounded_load_all_complete_none_lost(server, client):
    import psutil
    rss0 = psutil.Process(server.proc.pid).memory_info().rss

    def one(i):
        n = 4 + i % 13
        if i % 2:
            chunks = list(greedy(client, PROMPTS[i % 4], n, stream=True))
            return chunks[0].id, [t for c in chunks for t in c.choices[0].token_ids], n
        r = greedy(client, PROMPTS[i % 4], n)
        return r.id, r.choices[0].token_ids, n

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    assert len({rid for rid, _, _ in results}) == 64
    assert all(len(ids) == n for _, ids, n in results)
    rss1 = psutil.Process(server.proc.pid).memory_info().rss
    assert rss1 < rss0 * 1.25 + 20e6, (rss0, rss1)


def test_startup_errors_are_one_line_before_binding(server, export, capsys):
    from conftest import run_cli
    for argv, words in ((["serve", "/no/such/model"], ""), (["serve", str(export), "--backend", "genai"], "genai"),
                        (["serve", str(export), "--port", str(server.port)], "cannot listen")):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err


def test_sigterm_drains_in_flight_requests_and_exits_0(server, client):
    """Last in the module: it stops the server."""
    got = {}

    def long():
        got["r"] = greedy(client, PROMPTS[0], 300)

    t = threading.Thread(target=long)
    t.start()
    while _running(server) == 0:
        time.sleep(0.02)
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(60) == 0
    t.join(5)
    assert got["r"].choices[0].finish_reason == "length" and len(got["r"].choices[0].token_ids) == 300
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", server.port, timeout=5).connect()


def _running(server) -> float:
    return server.metrics()[("dsmoe_running", frozenset())]
