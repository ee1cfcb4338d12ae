"""Running the model: the static-cache decoder (CUDA-graph shape discipline, checked on the CPU
without the graph), device-built models, device resolution."""

from __future__ import annotations

import pytest
import torch
from conftest import ROUTING_VARIANTS

import dsmoe
from dsmoe.app.cuda_graphs import StaticDecoder, static_length
from dsmoe.app.device import resolve_device
from dsmoe.app.generate import eager_step, empty_cache, fused_step, greedy_generate
from dsmoe.errors import DsmoeError

PROMPT = [1, 17, 42, 7, 99]


@pytest.fixture(scope="module")
def tiny():
    return dsmoe.load("preset:tiny", overrides=ROUTING_VARIANTS["v3-noaux-tc"])


@pytest.fixture(scope="module")
def fused(tiny):
    return fused_step(tiny)


def test_static_decoder_generates_what_eager_does(tiny, fused):
    ref = greedy_generate(eager_step(tiny), tiny.config, PROMPT, 12)
    dec = StaticDecoder(fused, tiny.config, max_len=static_length(len(PROMPT) + 12))
    assert greedy_generate(dec, tiny.config, PROMPT, 12) == ref
    # a second sequence on the same decoder (shorter prompt: stale slots must be masked again)
    assert greedy_generate(dec, tiny.config, PROMPT[:2], 5) == greedy_generate(eager_step(tiny), tiny.config,
                                                                                 PROMPT[:2], 5)


def test_static_decoder_step_by_step(tiny, fused):
    """Logits and the returned cache equal the eager model's at every step; the static cache is
    reused in place (same storage) from the second decode step on."""
    c = tiny.config
    dec = StaticDecoder(fused, c, max_len=12)
    step = eager_step(tiny)
    ids = torch.tensor([PROMPT])
    args = (ids, torch.ones(1, 5, dtype=torch.int64), torch.arange(5)[None], empty_cache(c, 1, torch.float32))
    (l_ref, p_ref), (l_got, p_got) = step(*args), dec(*args)
    ptr = p_got[0][0].data_ptr()
    for i in range(6):
        a = (torch.tensor([[3 + i]]), torch.ones(1, 6 + i, dtype=torch.int64), torch.tensor([[5 + i]]))
        (l_ref, p_ref), (l_got, p_got) = step(*a, p_ref), dec(*a, p_got)
        torch.testing.assert_close(l_got, l_ref, rtol=1e-4, atol=1e-5)
        for (k, v), (k2, v2) in zip(p_ref, p_got):
            torch.testing.assert_close(k2, k, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v2, v, rtol=1e-4, atol=1e-5)
        assert p_got[0][0].data_ptr() == ptr and p_got[0][0].shape[2] == 6 + i
    full = [(torch.zeros(1, c.num_key_value_heads, 11, c.head_dim),) * 2] * c.num_hidden_layers
    with pytest.raises(DsmoeError, match="exceeds the static cache"):
        dec(torch.tensor([[1, 2]]), torch.ones(1, 13, dtype=torch.int64), torch.tensor([[11, 12]]), full)


def test_static_decoder_takes_a_foreign_cache_and_padding(tiny, fused):
    """A decode call with a cache it did not produce (and a left-padded mask) is copied in first."""
    c = tiny.config
    dec = StaticDecoder(fused, c, max_len=16)
    g = torch.Generator().manual_seed(0)
    past = [(torch.randn(1, c.num_key_value_heads, 7, c.head_dim, generator=g),
             torch.randn(1, c.num_key_value_heads, 7, c.head_dim, generator=g)) for _ in range(c.num_hidden_layers)]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    a = (torch.tensor([[5]]), mask, torch.tensor([[5]]))
    l_ref, _ = eager_step(tiny)(*a, past)
    l_got, _ = dec(*a, past)
    torch.testing.assert_close(l_got, l_ref, rtol=1e-4, atol=1e-5)


def test_cuda_graph_needs_cuda(tiny, fused):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(DsmoeError, match="needs a CUDA device"):
        StaticDecoder(fused, tiny.config, max_len=8, cuda_graph=True)
    with pytest.raises(DsmoeError, match="no CUDA device here"):
        resolve_device("cuda")


def test_static_length():
    assert static_length(1) == 64 and static_length(64) == 64 and static_length(65) == 128
    assert static_length(100, 16) == 112


@pytest.mark.parametrize("tie", [False, True])
def test_init_model_is_deterministic_and_keeps_ties(tie):
    cfg = dsmoe.load_config("preset:tiny", {"tie_word_embeddings": tie, **ROUTING_VARIANTS["v3-noaux-tc"]})
    a, b = dsmoe.init_model(cfg, seed=4, dtype="bfloat16"), dsmoe.init_model(cfg, seed=4, dtype="bfloat16")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    assert (a.lm_head.weight is a.model.embed_tokens.weight) == tie
    assert a.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert a.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not torch.equal(a.model.layers[1].mlp.experts[0].gate_proj.weight,
                           dsmoe.init_model(cfg, seed=5, dtype="bfloat16").model.layers[1].mlp.experts[0].gate_proj.weight)
