"""Model configuration: a dataclass that reads and writes Hugging Face ``config.json``.

Field names are those of the DeepSeekMoE remote code (``model_type: "deepseek"``), extended with
the routing fields of DeepSeek-V2/V3 (``topk_method``, ``n_group``, ``topk_group``,
``routed_scaling_factor``) so that every routing variant is an explicit field, never inferred from
a tensor shape, and with DeepSeek-V2/V3's MLA fields (``model_type`` ``deepseek_v2`` /
``deepseek_v3``; their reading and checks live in :mod:`dsmoe.mla_config`, YaRN in
:mod:`dsmoe.rope`). Named presets (:data:`PRESETS`) give the test models, the demo defaults and the
real DeepSeekMoE-16B and DeepSeek-V2-Lite dimensions; any field can be overridden
(``--set num_hidden_layers=2``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsmoe.errors import ConfigError, DsmoeWarning
from dsmoe.functional import ACTIVATIONS
from dsmoe.mla_config import MLA_MODEL_TYPES, MLA_ONLY_FIELDS, mla_from_dict, validate_mha_only, validate_mla, yarn
from dsmoe.routing import SCORING_FUNCS, TOPK_METHODS, RoutingSpec

TOPK_METHOD_ALIASES = {"gready": "greedy"}  # some DeepSeek code spells it so
MODEL_TYPES = ("deepseek", *MLA_MODEL_TYPES)


@dataclass
class DeepseekConfig:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001  # Hugging Face allows a list of stop ids
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    model_type: str = "deepseek"
    architectures: list[str] = field(default_factory=lambda: ["DeepseekForCausalLM"])
    # ---- MLA (deepseek_v2 / deepseek_v3 only; null for model_type "deepseek") ----------------
    q_lora_rank: int | None = None          # null: one q_proj (V2-Lite); else q_a_proj → norm → q_b_proj
    kv_lora_rank: int | None = None         # R: width of the compressed latent c_KV
    qk_nope_head_dim: int | None = None     # per-head query/key part without RoPE
    qk_rope_head_dim: int | None = None     # per-head query part with RoPE; the key part is shared
    v_head_dim: int | None = None
    rope_interleave: bool = True            # RoPE pairs adjacent dims (DeepSeek's layout)
    num_nextn_predict_layers: int = 0       # V3 multi-token-prediction layers (skipped for inference)
    quantization_config: dict | None = None  # fp8 e4m3 with 128×128 block scales (dequantized on load)
    # Keys of config.json this dataclass does not model; written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Fields config.json left out that took transformers' default (``info`` says so); not written.
    defaults_taken: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The stop ids: ``eos_token_id`` as a tuple (it may be one id, a list, or absent)."""
        e = self.eos_token_id
        return () if e is None else tuple(e) if isinstance(e, list) else (e,)

    @property
    def is_mla(self) -> bool:
        """Multi-head Latent Attention (DeepSeek-V2/V3), from the model type (an explicit field)."""
        return self.model_type in MLA_MODEL_TYPES

    @property
    def qk_head_dim(self) -> int:
        """MLA query/key head width: ``qk_nope_head_dim + qk_rope_head_dim``."""
        return (self.qk_nope_head_dim or 0) + (self.qk_rope_head_dim or 0)

    @property
    def rotary_dim(self) -> int:
        """The width RoPE rotates: the whole head (MHA) or the rope part (MLA)."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of an fp8 checkpoint's weight-scale blocks, or None."""
        q = self.quantization_config
        return tuple(q["weight_block_size"]) if q else None

    @property
    def has_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, i: int) -> bool:
        """The spec's layer rule: MoE iff routed experts exist, i >= first_k_dense_replace and
        i % moe_layer_freq == 0; otherwise a dense SwiGLU MLP of width intermediate_size."""
        return self.has_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def shared_intermediate_size(self) -> int:
        return (self.n_shared_experts or 0) * self.moe_intermediate_size

    @property
    def routing(self) -> RoutingSpec:
        k = self.num_experts_per_tok or 1
        v3 = self.topk_method == "noaux_tc"
        return RoutingSpec(
            scoring=self.scoring_func,
            topk_method=self.topk_method,
            top_k=k,
            n_group=self.n_group or 1,
            topk_group=self.topk_group or 1,
            norm_topk_prob=bool(self.norm_topk_prob and (v3 or k > 1)),
            scaling=float(self.routed_scaling_factor),
            scale_when="always" if v3 else "unnormalized",
        )

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> DeepseekConfig:
        """Raise :class:`ConfigError` (one line, names the field) unless the config is usable."""
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {self.model_type!r} "
                              f"(supported: {', '.join(repr(t) for t in MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            _positive_int(self, name)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.is_mla:
            validate_mla(self)
        else:
            validate_mha_only(self)
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
        head_dim = self.extra.get("head_dim")
        if not self.is_mla and head_dim is not None and head_dim != self.head_dim:  # MLA: validate_mla
            raise ConfigError(f"head_dim {head_dim!r} disagrees with hidden_size {self.hidden_size} / "
                              f"num_attention_heads {self.num_attention_heads} = {self.head_dim} (multi-head "
                              "attention of model_type 'deepseek' has head_dim = hidden_size / heads)")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"{name} must be a token id (an integer >= 0{', or a list of them' if name[0] == 'e' else ''}), "
                                  f"got {v!r}")
        for name in ("rms_norm_eps", "initializer_range", "aux_loss_alpha", "routed_scaling_factor"):
            _finite_number(self, name)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be an object (or null), got {self.rope_scaling!r}")
        if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.has_moe:
            self._validate_moe()
        return self

    def _validate_moe(self) -> None:
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq"):
            _positive_int(self, name)
        if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
            raise ConfigError(f"first_k_dense_replace must be an integer >= 0, got {self.first_k_dense_replace!r}")
        if not isinstance(self.n_shared_experts, (int, type(None))) or (self.n_shared_experts or 0) < 0:
            raise ConfigError(f"n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}")
        E, K = self.n_routed_experts, self.num_experts_per_tok
        if K > E:
            raise ConfigError(f"num_experts_per_tok {K} exceeds n_routed_experts {E}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"unknown scoring_func {self.scoring_func!r} (supported: {', '.join(SCORING_FUNCS)})")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"unknown topk_method {self.topk_method!r} (supported: {', '.join(TOPK_METHODS)})")
        if not isinstance(self.routed_scaling_factor, (int, float)) or self.routed_scaling_factor <= 0:
            raise ConfigError(f"routed_scaling_factor must be a positive number, got {self.routed_scaling_factor!r}")
        if self.topk_method == "greedy":
            if (self.n_group or 1) > 1 or (self.topk_group or 1) > 1:
                warnings.warn(DsmoeWarning(f"n_group {self.n_group} / topk_group {self.topk_group} are ignored: "
                                           "topk_method 'greedy' chooses among all experts (group-limited routing "
                                           "is topk_method 'group_limited_greedy' or 'noaux_tc')"), stacklevel=2)
            return
        G, TG = self.n_group or 1, self.topk_group or 1
        for name, v in (("n_group", G), ("topk_group", TG)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if E % G:
            raise ConfigError(f"n_routed_experts {E} is not divisible by n_group {G}")
        if TG > G:
            raise ConfigError(f"topk_group {TG} exceeds n_group {G}")
        if K > TG * (E // G):
            raise ConfigError(f"num_experts_per_tok {K} exceeds the {TG * (E // G)} experts left "
                              f"in topk_group {TG} of n_group {G} groups")
        if self.topk_method == "noaux_tc" and E // G < 2:
            raise ConfigError(f"topk_method 'noaux_tc' scores a group by its top-2 experts, "
                              f"but each of the {G} groups has {E // G}")

    # ---- (de)serialization ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepseekConfig:
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        d = dict(d)
        if d.get("topk_method") in TOPK_METHOD_ALIASES:
            d["topk_method"] = TOPK_METHOD_ALIASES[d["topk_method"]]
        _read_rope_parameters(d)  # transformers v5 writes RoPE there
        if "dtype" in d and "torch_dtype" not in d:  # transformers v5 writes "dtype"
            d["torch_dtype"] = d.pop("dtype")
        taken = _transformers_defaults(d)
        if d.get("model_type") in MLA_MODEL_TYPES:
            mla_from_dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "defaults_taken"}
        kwargs = {k: _coerce(cls, k, v) for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs, extra=extra, defaults_taken=taken)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "defaults_taken")}
        if not self.is_mla:  # MHA configs keep the DeepSeekMoE-16B key set
            for name in MLA_ONLY_FIELDS:
                if d[name] == _DEFAULTS[name]:
                    del d[name]
        return {**self.extra, **d}

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"missing config: {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"malformed config {path}: {e}") from None
        return cls.from_dict(d).validate()

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def override(self, overrides: dict[str, Any] | None) -> DeepseekConfig:
        """A copy with fields replaced (values coerced to the field's type) and validated."""
        if not overrides:
            return dataclasses.replace(self).validate()
        known = {f.name for f in dataclasses.fields(self)} - {"extra", "defaults_taken"}
        for k in overrides:
            if k not in known:
                raise ConfigError(f"unknown config field {k!r} in override")
        d = self.to_dict()
        d.update(overrides)
        new = type(self).from_dict(d)
        new.defaults_taken = {k: v for k, v in self.defaults_taken.items() if k not in overrides}
        return new.validate()

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DeepseekConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
        return cls(**PRESETS[name]).override(overrides)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DeepseekConfig) if f.default is not dataclasses.MISSING}


ROPE_TYPES_WITH_SCALING = ("linear", "dynamic", "yarn", "longrope", "llama3")


def _read_rope_parameters(d: dict[str, Any]) -> None:
    """transformers-v5 ``rope_parameters`` → the ``rope_theta`` / ``rope_scaling`` fields (in place).

    ``{"rope_theta": θ, "rope_type": "default"}`` is plain RoPE; any other ``rope_type`` becomes
    ``rope_scaling`` as written (which :meth:`DeepseekConfig.validate` accepts — YaRN for MLA
    models — or refuses by type). A field it does not know, or a value that disagrees with a
    legacy ``rope_theta``/``rope_scaling`` in the same file, is a :class:`ConfigError` — never a
    silent default.
    """
    rp = d.pop("rope_parameters", None)
    if rp is None:
        return
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters must be an object, got {rp!r}")
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConfigError(f"per-layer-type rope_parameters ({', '.join(rp)}) are not supported")
    params = dict(rp)
    theta = params.pop("rope_theta", None)
    if theta is not None:
        if d.get("rope_theta") not in (None, theta):
            raise ConfigError(f"rope_theta {d['rope_theta']!r} disagrees with rope_parameters.rope_theta {theta!r}")
        d["rope_theta"] = theta
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        unknown = sorted(k for k in params if k not in ("rope_type", "type"))
        if unknown:
            raise ConfigError(f"rope_parameters field {unknown[0]!r} is not understood for rope_type 'default'")
        if d.get("rope_scaling") not in (None, {}):
            raise ConfigError("rope_parameters says rope_type 'default' but rope_scaling is set")
        return
    if kind not in ROPE_TYPES_WITH_SCALING:
        raise ConfigError(f"unknown rope_parameters.rope_type {kind!r}")
    if d.get("rope_scaling") not in (None, {}) and d["rope_scaling"] != params:
        raise ConfigError("rope_scaling disagrees with rope_parameters")
    d["rope_scaling"] = params


def _transformers_defaults(d: dict[str, Any]) -> dict[str, str]:
    """Fields a config.json may leave out, filled as transformers fills them (in place); returns
    ``{field: what was assumed}`` for ``info`` to show. Never dsmoe's own preset values."""
    taken = {}
    if d.get("torch_dtype") is None:  # transformers loads weights in float32 unless told otherwise
        d["torch_dtype"] = "float32"
        taken["torch_dtype"] = "float32 (transformers' default: config.json names no torch_dtype)"
    if d.get("num_key_value_heads") is None and isinstance(d.get("num_attention_heads"), int):
        d["num_key_value_heads"] = d["num_attention_heads"]  # transformers: one KV head per query head
        taken["num_key_value_heads"] = (f"{d['num_attention_heads']} = num_attention_heads (transformers' default: "
                                        "config.json names no num_key_value_heads)")
    return taken


def _finite_number(cfg: DeepseekConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")


def _positive_int(cfg: DeepseekConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


_FIELD_TYPES: dict[str, str] = {}


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Coerce JSON/CLI values to the field's declared type; a clear error when impossible."""
    if not _FIELD_TYPES:
        _FIELD_TYPES.update({f.name: str(f.type) for f in dataclasses.fields(cls)})
    t = _FIELD_TYPES[name]
    if value is None:
        return None
    try:
        if isinstance(value, list) and "list[int]" in t:  # e.g. eos_token_id: [1, 2]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError
            return list(value)
        if (t.startswith("int") or t.startswith("float")) and isinstance(value, bool):
            raise ValueError  # true/false is not a number
        if t.startswith("int") and not isinstance(value, (list, dict)):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if t.startswith("float"):
            return float(value)  # NaN/Inf: refused by validate(), naming the field
        if t == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config field {name!r}: expected {t}, got {value!r}") from None
    return value


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings (VALUE as JSON when it parses, else a plain string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


_MLA_V2: dict[str, Any] = dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], q_lora_rank=None)

# Named presets. `tiny` is for tests (a dense layer, then MoE layers; 8 routed experts, 2 shared),
# `small` is the demo default (the real structure at a size this 2-core machine runs comfortably),
# `deepseek-moe-16b` has the real dimensions of deepseek-ai/deepseek-moe-16b-base.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    ),
    "small": dict(
        vocab_size=16384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    ),
    "deepseek-moe-16b": dict(),  # the dataclass defaults are the real 16B config
    # ---- MLA (DeepSeek-V2/V3 attention) ----
    # `mla-tiny`: tests (q_lora set, YaRN factor 4 over 64 positions so tests run past it);
    # `mla-small`: the MLA demo (V2-Lite's structure: q_proj, YaRN, softmax greedy);
    # `v3-small`: V3-style (q_lora, sigmoid + bias noaux_tc routing in groups, 1 shared expert);
    # `deepseek-v2-lite`: the published dimensions of deepseek-ai/DeepSeek-V2-Lite.
    "mla-tiny": dict(
        _MLA_V2, vocab_size=256, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2,
        q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=256, rope_scaling=yarn(4.0, 64, mscale=0.707, mscale_all_dim=0.707),
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    ),
    "mla-small": dict(
        _MLA_V2, vocab_size=16384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=8192, rope_scaling=yarn(4.0, 2048, mscale=0.707, mscale_all_dim=0.707),
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    ),
    "v3-small": dict(
        _MLA_V2, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
        vocab_size=16384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4,
        scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, max_position_embeddings=8192, rope_scaling=yarn(4.0, 2048, mscale=1.0, mscale_all_dim=1.0),
        bos_token_id=0, eos_token_id=1, torch_dtype="float32",
    ),
    "deepseek-v2-lite": dict(
        _MLA_V2, vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_position_embeddings=163840, rope_scaling=yarn(40.0, 4096, mscale=0.707, mscale_all_dim=0.707),
        torch_dtype="bfloat16",
    ),
}
