"""DeepSeek-V2/V3 (MLA attention, YaRN RoPE): transformers' own models as the peer, the latent
cache, presets, and every unsupported or inconsistent config named in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import MLA_PEERS, hf_greedy, hf_mla_model

import dsmoe
from dsmoe import rope
from dsmoe.app.generate import eager_step, greedy_generate
from dsmoe.architecture import architecture
from dsmoe.cache import cache_layout, expanded_values_per_token
from dsmoe.config import DeepseekConfig
from dsmoe.errors import ConfigError

RTOL = 1e-4  # the bound, fp32


def rel_err(ref, got) -> float:
    return ((ref - got).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=list(MLA_PEERS))
def peer(request, tmp_path_factory):
    """(name, transformers model, dsmoe model loaded from its save_pretrained checkpoint)."""
    hf = hf_mla_model(request.param)
    out = tmp_path_factory.mktemp("hf") / request.param
    # one peer is saved sharded (index + several files), as large checkpoints are
    hf.save_pretrained(out, max_shard_size="200KB" if request.param == "v2-group-limited" else "5GB")
    return request.param, hf, dsmoe.load(out), out


@pytest.mark.parametrize("start", [0, 100])  # 100: past original_max_position_embeddings (64)
def test_logits_equal_transformers(peer, start):
    name, hf, ours, _ = peer
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(start))
    pos = torch.arange(start, start + 12).expand(2, 12)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        got = ours(ids, position_ids=pos)
    assert rel_err(ref, got) <= RTOL, name


def test_greedy_tokens_equal_transformers_past_the_original_context(peer):
    """A 58-token prompt and 14 new tokens cross original_max_position_embeddings (64)."""
    name, hf, ours, _ = peer
    prompt = torch.randint(0, 256, (58,), generator=torch.Generator().manual_seed(7)).tolist()
    assert greedy_generate(eager_step(ours), ours.config, prompt, 14) == hf_greedy(hf, prompt, 14), name


def test_config_read_from_transformers(peer):
    _, _, ours, out = peer
    c, raw = ours.config, json.loads((out / "config.json").read_text())
    assert c.is_mla and c.model_type == raw["model_type"]
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == \
        (raw["q_lora_rank"], 32, 16, 8, 16)
    assert c.rope_scaling == ({k: v for k, v in raw["rope_parameters"].items() if k != "rope_theta"}
                              if raw["rope_parameters"]["rope_type"] == "yarn" else None)
    if raw["model_type"] == "deepseek_v3":  # transformers' V3 config leaves routing implied
        assert "scoring_func" not in raw and (c.scoring_func, c.topk_method) == ("sigmoid", "noaux_tc")


def test_cache_is_the_latent(peer):
    """One latent per token and layer: [c_KV ‖ k_rope], 32 + 8 values (MHA-style: 4 × (24 + 16))."""
    _, _, ours, _ = peer
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        full = ours(ids)
        logits, cache = ours(ids[:, :3], use_cache=True)
        steps = [logits]
        for t in (3, 4):
            logits, cache = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    layout = cache_layout(ours.config)
    assert layout.names == ("latent",) and [tuple(t.shape) for t in cache[0]] == [(1, 1, 5, 40)]
    assert layout.values_per_token() == 40 and expanded_values_per_token(ours.config) == 4 * (24 + 16)


def test_latent_cache_holds_the_normalized_latent_then_the_rotated_rope_key(peer):
    """The cache's contract, recomputed from the checkpoint's own transformers modules: layer 0's
    latent is kv_a_layernorm(c_KV) then k_rope after RoPE, in rotate-half order."""
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as v2
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as v3

    name, hf, ours, _ = peer
    ids, pos = torch.tensor([[3, 1, 4, 1, 5, 9]]), torch.arange(6)[None]
    with torch.no_grad():
        _, cache = ours(ids, use_cache=True)
        attn = hf.model.layers[0].self_attn
        x = hf.model.layers[0].input_layernorm(hf.model.embed_tokens(ids))
        c_kv, k = torch.split(attn.kv_a_proj_with_mqa(x), [32, 8], dim=-1)
        k, pe = k.view(1, 1, 6, 8), hf.model.rotary_emb(x, pos)
        if MLA_PEERS[name][0] == "v2":  # complex multiply, interleaved output: de-interleave it
            k = v2.apply_rotary_emb(k, k, pe)[1]
            k = torch.cat([k[..., 0::2], k[..., 1::2]], dim=-1)
        elif hf.config.rope_interleave:
            k = v3.apply_rotary_pos_emb_interleave(k, k, *pe)[1]
        else:
            k = v3.apply_rotary_pos_emb(k, k, *pe)[1]
        want = torch.cat([attn.kv_a_layernorm(c_kv)[0], k[0, 0]], dim=-1)
    torch.testing.assert_close(cache[0][0][0, 0], want, rtol=1e-5, atol=1e-6)


# ---- YaRN ---------------------------------------------------------------------------------------

def test_yarn_closed_form():
    """V2-Lite's numbers: factor 40, mscale 0.707 → softmax scale ·(0.1·0.707·ln 40 + 1)²; the
    highest frequency is kept, the lowest divided by 40, cos/sin unscaled (mscale = mscale_all_dim)."""
    c = DeepseekConfig.from_name("deepseek-v2-lite")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert rope.softmax_scale(c.qk_head_dim, c.rope_scaling, c.max_position_embeddings) == pytest.approx(192 ** -0.5 * m * m)
    freq, attention = rope.inv_freq(64, 10000.0, c.rope_scaling, c.max_position_embeddings)
    plain, _ = rope.inv_freq(64, 10000.0, None, c.max_position_embeddings)
    assert attention == 1.0 and freq[0].item() == plain[0].item()
    assert freq[-1].item() == pytest.approx(plain[-1].item() / 40, rel=1e-6)
    assert torch.all(freq <= plain) and torch.all(freq >= plain / 40 * (1 - 1e-6))
    _, a2 = rope.inv_freq(64, 10000.0, {**c.rope_scaling, "mscale": 1.0, "mscale_all_dim": 0.0}, 1)
    assert a2 == pytest.approx(0.1 * math.log(40) + 1)  # no mscale pair: YaRN's default temperature


# ---- presets ------------------------------------------------------------------------------------

def test_v2_lite_preset_has_the_published_dimensions():
    c = DeepseekConfig.from_name("deepseek-v2-lite")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim,
            c.qk_rope_head_dim, c.v_head_dim) == (27, 2048, 16, 512, 128, 64, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size) == (64, 6, 2, 1408)
    assert c.q_lora_rank is None and c.moe_layers == list(range(1, 27)) and c.intermediate_size == 10944
    assert c.vocab_size == 102400 and c.rope_scaling["factor"] == 40 and c.rope_scaling["original_max_position_embeddings"] == 4096
    a = architecture(c)
    # model card: 15.7B total, 2.4B active (its count leaves out the embedding table: 2.66B - 0.21B)
    assert round(a.params_total / 1e9, 1) == 15.7 and round(a.params_active / 1e9, 2) == 2.66
    assert cache_layout(c).values_per_token() == 576 and expanded_values_per_token(c) == 16 * (192 + 128)


@pytest.mark.parametrize("name", ["mla-tiny", "mla-small", "v3-small"])
def test_mla_presets_run_with_the_latent_cache(name):
    """Each MLA preset at 2 layers and a 512-token vocabulary (the sizes that matter for the check)."""
    model = dsmoe.load(f"preset:{name}", overrides={"num_hidden_layers": 2, "vocab_size": 512})
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits, cache = model(ids, use_cache=True)
    c = model.config
    assert logits.shape == (1, 3, c.vocab_size) and torch.isfinite(logits).all()
    assert cache[0][0].shape == (1, 1, 3, c.kv_lora_rank + c.qk_rope_head_dim)
    assert architecture(c).params_total == sum(p.numel() for p in model.parameters())


# ---- what is refused --------------------------------------------------------------------------

def _mla(**change):
    d = DeepseekConfig.from_name("mla-tiny").to_dict()
    for k, v in change.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return d


_DROP = object()


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "unsupported rope_scaling type 'linear' (supported: yarn"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "needs original_max_position_embeddings"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "alpha": 1}},
     "unknown field 'alpha'"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}}, "factor must be >= 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1,
                       "beta_slow": 2}}, "beta_fast > beta_slow"),
    ({"kv_lora_rank": _DROP}, "missing MLA field 'kv_lora_rank'"),
    ({"q_lora_rank": _DROP}, "missing MLA field 'q_lora_rank'"),
    ({"v_head_dim": None}, "v_head_dim must be a positive integer"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim 7 must be even"),
    ({"head_dim": 24}, "inconsistent head dims: head_dim 24"),
    ({"qk_head_dim": 30}, "inconsistent head dims: qk_head_dim 30"),
    ({"num_key_value_heads": 2}, "inconsistent head counts"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"quantization_config": {"quant_method": "gptq", "weight_block_size": [128, 128]}}, "unsupported quantization"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size must be two"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers must be an integer >= 0"),
])
def test_bad_mla_configs_are_one_line_errors(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps(_mla(**change)))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        DeepseekConfig.from_json(tmp_path)
    assert "\n" not in str(e.value)


def test_mla_fields_on_a_deepseek_v1_config_are_refused():
    with pytest.raises(ConfigError, match="kv_lora_rank is set, but model_type 'deepseek' uses multi-head attention"):
        DeepseekConfig.from_name("tiny", kv_lora_rank=32)
    with pytest.raises(ConfigError, match="YaRN is for deepseek_v2/deepseek_v3"):
        DeepseekConfig.from_name("tiny", rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64})


def test_rope_parameters_and_rope_scaling_must_agree():
    d = _mla(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                              "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="rope_scaling disagrees with rope_parameters"):
        DeepseekConfig.from_dict(d)


def test_bad_mla_config_through_the_cli(tmp_path, capsys):
    from conftest import run_cli

    (tmp_path / "config.json").write_text(json.dumps(_mla(head_dim=24)))
    code, _, err = run_cli(capsys, "info", tmp_path)
    assert code == 2 and err.startswith("error: inconsistent head dims") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("change", [{}, {"q_lora_rank": None}, {"attention_bias": True}])
def test_architecture_counts_what_the_model_holds(change):
    c = DeepseekConfig.from_name("mla-tiny", **change)
    model = dsmoe.init_model(c)
    assert architecture(c).params_total == sum(p.numel() for p in model.parameters())
