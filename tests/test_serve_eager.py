"""``dsmoe serve`` on the eager backend (a checkpoint, no export, no tokenizer): concurrent greedy
requests of different lengths joining a running batch at different steps get exactly their tokens
alone (``dsmoe generate --backend eager``), and the expert counts come from the eager model's
router hooks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import dsmoe
from dsmoe.checkpoint import save_checkpoint

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_serve import KEY, PROMPTS, Server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("eager")
    save_checkpoint(dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2}), root / "tiny")
    s = Server(root / "tiny", root / "serve.log", "--backend", "eager", "--max-running", "3", "--max-step-tokens", "6")
    s.ckpt = root / "tiny"
    yield s
    s.proc.terminate()
    assert s.proc.wait(60) == 0


def test_eager_batched_equals_alone(server):
    from dsmoe.app.generate import run_generate
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    lengths = [120, 12, 7, 10]  # the anchor decodes long enough for the others to join it
    alone = [run_generate(source=str(server.ckpt), prompt_ids=" ".join(map(str, p)), max_new_tokens=n)[0][0]
             for p, n in zip(PROMPTS, lengths)]
    anchor = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=lengths[0], temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    first = next(iter(anchor))

    def one(i):
        if i == 0:
            return first.choices[0].token_ids + [t for c in anchor for t in c.choices[0].token_ids]
        time.sleep(0.01 * i)
        return client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].token_ids

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, range(4)))
    assert got == alone
    m = server.metrics()
    assert m[("dsmoe_batch_size_bucket", frozenset({("le", "1.0")}))] < m[("dsmoe_batch_size_count", frozenset())]
    routed = sum(len(p) + n - 1 for p, n in zip(PROMPTS, lengths)) * 2  # top-2 of every token the model read
    assert m[("dsmoe_expert_routed_slots_total", frozenset({("layer", "1")}))] == routed
