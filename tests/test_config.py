import json

import pytest

from dsmoe.architecture import architecture
from dsmoe.config import PRESETS, DeepseekConfig, parse_overrides
from dsmoe.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    c = DeepseekConfig.from_name(name)
    assert c.validate() is c


def test_tiny_has_dense_then_moe_layers():
    c = DeepseekConfig.from_name("tiny")
    assert c.moe_layers == [1, 2] and c.n_routed_experts >= 8 and c.n_shared_experts == 2


def test_deepseek_moe_16b_parameter_counts():
    a = architecture(DeepseekConfig.from_name("deepseek-moe-16b"))
    assert round(a.params_total / 1e9, 1) == 16.4
    assert round(a.params_active / 1e9, 1) == 2.8
    assert a.params_per_expert == 8_650_752  # spec: one expert 8.65M parameters


def test_layer_rule():
    c = DeepseekConfig.from_name("tiny", num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    assert c.moe_layers == [2, 4]


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    d = DeepseekConfig.from_name("small").to_dict()
    d["auto_map"] = {"AutoConfig": "x"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = DeepseekConfig.from_json(tmp_path)
    assert c == DeepseekConfig.from_name("small")
    assert json.loads(c.to_json_string())["auto_map"] == {"AutoConfig": "x"}


def test_gready_alias_and_v5_dtype_key():
    c = DeepseekConfig.from_dict({"topk_method": "gready", "dtype": "bfloat16"})
    assert c.topk_method == "greedy" and c.torch_dtype == "bfloat16"


@pytest.mark.parametrize("overrides, message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 exceeds n_routed_experts 8"),
    ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "not divisible by n_group 3"),
    ({"scoring_func": "relu"}, "unknown scoring_func 'relu'"),
    ({"topk_method": "best"}, "unknown topk_method 'best'"),
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 5}, "topk_group 5 exceeds n_group 4"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"rope_scaling": {"type": "yarn"}}, "unsupported feature rope_scaling"),
    ({"hidden_size": 65}, "not divisible by num_attention_heads"),
    ({"bogus": 1}, "unknown config field 'bogus'"),
    ({"num_hidden_layers": "two"}, "expected int"),
])
def test_validation_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        DeepseekConfig.from_name("tiny", **overrides)


@pytest.mark.parametrize("mt", ["deepseek_v2", "deepseek_v3"])
def test_mla_config_without_its_fields_is_refused(tmp_path, mt):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": mt}))
    with pytest.raises(ConfigError, match=f"{mt} config is missing MLA field 'q_lora_rank'"):
        DeepseekConfig.from_json(tmp_path)


@pytest.mark.parametrize("mt", ["deepseek_v32", "kimi_k2", "llama"])
def test_other_model_types_refused(tmp_path, mt):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": mt}))
    with pytest.raises(ConfigError, match=f"unsupported model_type '{mt}'.*'deepseek_v3'"):
        DeepseekConfig.from_json(tmp_path)


def test_malformed_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="missing config"):
        DeepseekConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed config"):
        DeepseekConfig.from_json(tmp_path)


def test_routing_spec_family_rules():
    v2 = DeepseekConfig.from_name("tiny", norm_topk_prob=True, num_experts_per_tok=1).routing
    assert not v2.norm_topk_prob and v2.scale_when == "unnormalized"  # V2 renormalizes only for K > 1
    v3 = DeepseekConfig.from_name("tiny", topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2,
                                  norm_topk_prob=True, num_experts_per_tok=1).routing
    assert v3.norm_topk_prob and v3.scale_when == "always"


def test_parse_overrides():
    assert parse_overrides(["a=1", "b=true", "c=softmax", "d=[1,2]"]) == {"a": 1, "b": True, "c": "softmax", "d": [1, 2]}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])
