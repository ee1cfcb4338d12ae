"""The decoding engine and sampling without HTTP: the scheduler (joins at different steps, chunked
prefill, slots freed), batched == alone against a cache-free greedy loop, a row whose logits turn
non-finite fails alone, seeded sampling independent of the batch, the logits processors against
hand-computed cases, incremental detokenization and the chat template against transformers."""

from __future__ import annotations

import pytest
import torch

import dsmoe
from dsmoe.app.engine import Engine, QueueFull
from dsmoe.app.generate import eager_step
from dsmoe.app.sampling import SamplingParams, sample
from dsmoe.app.step_timing import Timing
from dsmoe.errors import DsmoeError

PROMPTS = [[1, 5, 9, 17, 33, 40, 41], [7, 8, 100], [3, 200, 11, 12, 13], [9] * 11, [250, 4]]
NEW = [9, 6, 8, 5, 7]


@pytest.fixture(scope="module")
def model():
    return dsmoe.load("preset:tiny", overrides={"num_hidden_layers": 2})


_REF: dict = {}


def no_cache_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The independent reference: the whole sequence through the model at every step, no cache
    (remembered: greedy continuations are prefixes of each other)."""
    key = tuple(prompt)
    if len(_REF.get(key, ())) < n:
        _REF[key] = _no_cache_greedy(model, prompt, max(n, 9))
    return _REF[key][:n]


def _no_cache_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def drive(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]):
    """Add requests at the given engine steps; run to the end; the sequences in arrival order."""
    seqs, step = [], 0
    while step <= max(arrivals) or engine.has_work:
        for prompt, params in arrivals.get(step, []):
            seqs.append(engine.add(prompt, params))
        engine.step()
        step += 1
    return seqs


def test_batched_equals_alone_with_staggered_joins_and_chunked_prefill(model):
    want = [no_cache_greedy(model, p, n) for p, n in zip(PROMPTS, NEW)]
    batches = []
    eng = Engine(eager_step(model), model.config, max_running=3, max_step_tokens=6,
                 on_step=lambda b, p: batches.append((b, p)))
    arrivals = {0: [(PROMPTS[0], SamplingParams(max_tokens=NEW[0])), (PROMPTS[1], SamplingParams(max_tokens=NEW[1]))],
                2: [(PROMPTS[2], SamplingParams(max_tokens=NEW[2]))],
                3: [(PROMPTS[3], SamplingParams(max_tokens=NEW[3])), (PROMPTS[4], SamplingParams(max_tokens=NEW[4]))]}
    seqs = drive(eng, arrivals)
    assert [s.out for s in seqs] == want
    assert all(s.finish_reason == "length" for s in seqs)
    assert max(b for b, _ in batches) == 3                     # the slots were full at some step
    assert all(b + p <= 6 for b, p in batches)                 # the step budget held (prompts were chunked)
    assert eng.running == [] and eng.cache is None and eng.counts()["waiting"] == 0


class ViewsStep:
    """A step that returns its present as views of buffers it reuses for the next call of the same
    batch size, as a static-cache or in-place OrtDecoder and the CUDA-graph StaticDecoder do."""

    present_views = True

    def __init__(self, model):
        self.plain, self.bufs = eager_step(model), {}

    def __call__(self, input_ids, attention_mask, position_ids, past):
        logits, present = self.plain(input_ids, attention_mask, position_ids, past)
        B, n = input_ids.shape[0], present[0][0].shape[2]
        bufs = self.bufs.setdefault(B, [[torch.zeros(t.shape[0], t.shape[1], 64, t.shape[3]) for t in layer]
                                        for layer in present])
        out = []
        for layer, blayer in zip(present, bufs):
            for t, b in zip(layer, blayer):
                b[:, :, :n] = t
            out.append(tuple(b[:, :, :n] for b in blayer))
        return logits, out


def test_a_step_returning_views_of_reused_buffers_still_gives_alone_tokens(model):
    # through the timing wrapper of `dsmoe generate`, which must say what the step it wraps is
    eng = Engine(Timing().wrap(ViewsStep(model)), model.config, max_running=3, max_step_tokens=6)
    assert eng.views
    arrivals = {0: [(PROMPTS[0], SamplingParams(max_tokens=NEW[0]))], 1: [(PROMPTS[1], SamplingParams(max_tokens=NEW[1]))],
                4: [(PROMPTS[2], SamplingParams(max_tokens=NEW[2]))]}
    assert [s.out for s in drive(eng, arrivals)] == [no_cache_greedy(model, p, n) for p, n in zip(PROMPTS, NEW[:3])]


def test_eos_and_stop_ids_end_a_sequence_and_free_its_slot(model):
    free = no_cache_greedy(model, PROMPTS[0], 6)
    eng = Engine(eager_step(model), model.config, max_running=2)
    a = eng.add(PROMPTS[0], SamplingParams(max_tokens=6, stop_token_ids=(free[2],)))
    b = eng.add(PROMPTS[1], SamplingParams(max_tokens=4))
    eng.run()
    assert a.out == free[:3] and a.finish_reason == "stop"
    assert b.out == no_cache_greedy(model, PROMPTS[1], 4)


def test_a_row_with_nonfinite_logits_fails_alone(model):
    plain = eager_step(model)

    def broken(input_ids, attention_mask, position_ids, past):  # NaN for the row at position 9
        logits, present = plain(input_ids, attention_mask, position_ids, past)
        bad = (position_ids[:, -1] == 9).view(-1, 1, 1)
        return torch.where(bad, torch.full_like(logits, float("nan")), logits), present

    eng = Engine(broken, model.config, max_running=3)
    seqs = [eng.add(p, SamplingParams(max_tokens=n)) for p, n in zip(PROMPTS[:3], (8, 4, 3))]
    eng.run()
    assert seqs[0].finish_reason == "error" and "not finite" in seqs[0].error and len(seqs[0].out) == 3
    assert [s.out for s in seqs[1:]] == [no_cache_greedy(model, p, n) for p, n in zip(PROMPTS[1:3], (4, 3))]


def test_requests_the_engine_refuses(model):
    eng = Engine(eager_step(model), model.config, max_running=1, max_waiting=1, max_model_len=16)
    for prompt, params, what in (([], SamplingParams(), "empty"), ([1, 999], SamplingParams(), "vocabulary"),
                                 ([1] * 10, SamplingParams(max_tokens=7), "exceed the context"),
                                 ([1], SamplingParams(temperature=-1.0), "temperature")):
        with pytest.raises(DsmoeError, match=what):
            eng.add(prompt, params)
    eng.add([1, 2], SamplingParams(max_tokens=4))
    with pytest.raises(QueueFull):
        eng.add([1, 2], SamplingParams(max_tokens=4))


def test_cancel_frees_the_slot_at_the_next_step(model):
    eng = Engine(eager_step(model), model.config, max_running=1)
    a = eng.add(PROMPTS[0], SamplingParams(max_tokens=50))
    b = eng.add(PROMPTS[1], SamplingParams(max_tokens=3))
    eng.step()
    eng.step()
    eng.cancel(a)
    eng.run()
    assert a.finish_reason == "cancelled" and len(a.out) == 2
    assert b.out == no_cache_greedy(model, PROMPTS[1], 3)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    p = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = Engine(eager_step(model), model.config)
    one = alone.add(PROMPTS[2], p)
    alone.run()
    crowd = Engine(eager_step(model), model.config, max_running=4)
    others = [crowd.add(q, SamplingParams(max_tokens=9, temperature=1.0, seed=i)) for i, q in enumerate(PROMPTS[:2])]
    again = crowd.add(PROMPTS[2], p)
    crowd.run()
    assert again.out == one.out and len(one.out) == 8
    other = Engine(eager_step(model), model.config)
    diff = other.add(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=99))
    other.run()
    assert diff.out != one.out and all(len(o.out) == 9 for o in others)


def test_sampling_processors_against_hand_computed_cases():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    # top_k 1 and a tiny top_p leave only the argmax, whatever the draw
    for s in range(5):
        c = sample(logits, [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=5.0, top_p=1e-6)],
                   [g(s), g(s + 100)], [[], []])
        assert c.tokens == [3, 0]
    # frequency 1.5 and presence 1 on token 3 seen twice: 3 - 2*1.5 - 1 = -1, so token 2 wins greedily
    c = sample(logits[:1], [SamplingParams(frequency_penalty=1.5, presence_penalty=1.0, logprobs=True, top_logprobs=2)],
               [None], [[3, 3]])
    want = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, -1.0]), -1)
    assert c.tokens == [2] and c.logprobs[0] == pytest.approx(float(want[2]))
    assert [i for i, _ in c.top[0]] == [2, 1]
    # temperature 1 draws follow the softmax (top_k 3 drops token 0): frequencies within 3 sigma
    n, counts = 3000, torch.zeros(4)
    gen = g(7)
    for _ in range(n):
        counts[sample(logits[:1], [SamplingParams(temperature=1.0, top_k=3)], [gen], [[]]).tokens[0]] += 1
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert counts[0] == 0
    assert torch.all((counts[1:] / n - p).abs() < 3 * torch.sqrt(p * (1 - p) / n))


# ---- text: detokenization and the chat template ------------------------------------------------

CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('bad role') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "héllo wörld ✓ ✓"], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "bos_token": "<s>",
                                                         "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def test_detokenizer_never_emits_broken_utf8_or_a_stop_prefix(text_dir):
    from dsmoe.app.text import Detokenizer, Text
    t = Text(text_dir)
    s = "héllo ✓ the lazy dog jumps ✓✓ over"
    ids = t.encode(s)
    assert t.decode(ids) == s
    d = Detokenizer(t)
    parts = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(parts) == s and not any("\ufffd" in p for p in parts)
    assert sum(1 for i in ids if len(t.tokenizer.id_to_token(i)) == 1) > 0  # some multi-byte chars span tokens
    d = Detokenizer(t, stop=("dog jumps",))
    parts = []
    for i in ids:
        parts.append(d.add(i))
        assert not "".join(parts).endswith(("d", "do", "dog", "dog "))
        if d.stopped:
            break
    assert "".join(parts) + d.flush() == "héllo ✓ the lazy " and d.stopped


def test_chat_template_renders_as_transformers_does(text_dir):
    from transformers import PreTrainedTokenizerFast

    from dsmoe.app.text import Text
    t = Text(text_dir)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(text_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    messages = [{"role": "system", "content": "  be brief "}, {"role": "user", "content": "héllo ✓"},
                {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "and the dog?"}]
    for gen in (True, False):
        assert t.chat_prompt(messages, add_generation_prompt=gen) == hf.apply_chat_template(
            messages, chat_template=CHATML, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(DsmoeError, match="bad role"):
        t.chat_prompt([{"role": "tool", "content": "x"}])
