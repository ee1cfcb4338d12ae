"""Issue 21, class 3: config values that are not numbers, and fields config.json leaves out."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

import dsmoe
from dsmoe.config import DeepseekConfig
from dsmoe.errors import ConfigError

MLA = DeepseekConfig.from_name("mla-tiny").to_dict()


def _cfg(base: dict, **fields) -> DeepseekConfig:
    d = json.loads(json.dumps(base))
    d.update(fields)
    return DeepseekConfig.from_dict(d).validate()


@pytest.mark.parametrize("field", ["rms_norm_eps", "routed_scaling_factor", "rope_theta", "initializer_range"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, False, "NaN"])
def test_class3_float_fields_refuse_nan_inf_and_booleans(field, value):
    with pytest.raises(ConfigError, match=field):
        _cfg(DeepseekConfig.from_name("tiny").to_dict(), **{field: value})


@pytest.mark.parametrize("field", ["beta_fast", "beta_slow", "factor", "mscale_all_dim"])
@pytest.mark.parametrize("value", [0, math.nan, math.inf, True])
def test_class3_yarn_fields_are_checked_never_replaced(field, value):
    if field == "mscale_all_dim" and value == 0:
        pytest.skip("mscale_all_dim 0 is transformers' own 'no correction'")
    with pytest.raises(ConfigError, match=field):
        _cfg(MLA, rope_scaling={**MLA["rope_scaling"], field: value})


@pytest.mark.parametrize("value", [["yarn"], "yarn", 4.0])
def test_class3_rope_scaling_that_is_not_a_mapping(value):
    for base in (MLA, DeepseekConfig.from_name("tiny").to_dict()):
        with pytest.raises(ConfigError, match="rope_scaling"):
            _cfg(base, rope_scaling=value)


def test_class3_overrides_are_checked_the_same(capsys):
    for item in ("rms_norm_eps=NaN", "routed_scaling_factor=Infinity", "rms_norm_eps=true", "num_hidden_layers=1e999"):
        code, out, err = run_cli(capsys, "info", "preset:tiny", "--set", item, "--json")
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (item, err)


def test_class3_fields_left_out_take_transformers_defaults_and_info_says_so(tmp_path, capsys):
    d = DeepseekConfig.from_name("tiny").to_dict()
    d["num_attention_heads"] = 4
    del d["torch_dtype"], d["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = dsmoe.load_config(tmp_path)
    assert cfg.torch_dtype == "float32" and cfg.num_key_value_heads == 4  # not bf16, not 16 (dsmoe's 16B preset)
    code, out, _ = run_cli(capsys, "info", tmp_path, "--json")
    assert code == 0
    notes = json.loads(out)["notes"]
    assert any("torch_dtype" in n and "transformers' default" in n for n in notes)
    assert any("num_key_value_heads" in n for n in notes)
    assert "torch_dtype" in cfg.to_dict() and "defaults_taken" not in cfg.to_dict()


def test_class3_info_json_is_standard_json(capsys):
    code, out, _ = run_cli(capsys, "info", "preset:mla-tiny", "--json")
    assert code == 0
    json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
