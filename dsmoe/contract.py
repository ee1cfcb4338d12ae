"""The model contract: the module classes and names that the passes, the checkpoint reader and
the benchmarks rely on, in one place.

The reference model (:mod:`dsmoe.model`) defines them with Hugging Face's names, so real
checkpoints load unrenamed; everything that *matches* on them imports them from here
(``tests/test_layers.py`` checks that the model still has every name listed).
"""

from __future__ import annotations

import re

from dsmoe.model import DeepseekMLP, DeepseekMoE, DeepseekRotaryEmbedding, MoEGate, MultiHeadLatentAttention

# classes whose scopes (``nn_module_stack``) the passes match
MOE_BLOCK = DeepseekMoE.__name__          # router + routed experts + shared experts
ROUTER = MoEGate.__name__                 # the gate: linear → scores → top-k → weights
GATED_MLP = DeepseekMLP.__name__          # dense MLP, each routed expert, the shared experts
ROTARY = DeepseekRotaryEmbedding.__name__
MLA_ATTENTION = MultiHeadLatentAttention.__name__  # DeepSeek-V2/V3 attention (``model.layers.N.self_attn``)

# attribute names inside a MoE block (``model.layers.N.mlp.<name>``) and inside a gated MLP
ROUTER_ATTR = "gate"
EXPERTS_ATTR = "experts"
SHARED_ATTR = "shared_experts"
GATE_PROJ, UP_PROJ, DOWN_PROJ = "gate_proj", "up_proj", "down_proj"
PROJS = (GATE_PROJ, UP_PROJ, DOWN_PROJ)
CORRECTION_BIAS = "e_score_correction_bias"   # V3 selection bias: a buffer, always fp32
INV_FREQ = "inv_freq"                         # rotary buffer, not persistent (never in a checkpoint)

# inside an MLA attention block: the latent's up-projection (keys without RoPE, values) and the output
KV_B_PROJ, O_PROJ = "kv_b_proj", "o_proj"

# parameters the passes add: the stacked routed experts (``…mlp.experts.w13 [E,2I,H]``, ``w2 [E,H,I]``);
# the absorbed MLA weights (``…self_attn.w_uk [nh, d_nope, R]``, ``w_uv [nh, d_v, R]``)
STACKED_W13, STACKED_W2 = "w13", "w2"
ABSORBED_W_UK, ABSORBED_W_UV = "w_uk", "w_uv"

# checkpoint keys
ROUTED_EXPERT = re.compile(rf"\.{EXPERTS_ATTR}\.(\d+)$")             # a module path ending in experts.N
HF_STACKED = re.compile(rf"^(model\.layers\.\d+\.mlp\.{EXPERTS_ATTR})\.(gate_up_proj|down_proj)$")  # transformers v5
FP32_KEY = re.compile(rf"(^|\.){CORRECTION_BIAS}$")
NON_PERSISTENT_KEY = re.compile(rf"(^|\.)rotary_emb\.{INV_FREQ}$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")                       # the layer a key belongs to
FP8_SCALE_SUFFIX = "_scale_inv"                    # ``X.weight_scale_inv``: the fp8 ``X.weight``'s block scales


def expert_linear(moe_path: str) -> re.Pattern:
    """``<moe_path>.experts.<e>.<gate_proj|up_proj|down_proj>`` → groups (e, projection)."""
    return re.compile(re.escape(moe_path) + rf"\.{EXPERTS_ATTR}\.(\d+)\.({'|'.join(PROJS)})$")


LAYER_PATH = re.compile(r"^model\.layers\.(\d+)(\.|$)")                      # model.layers.N[.…]


def layer_of(path: str) -> int | None:
    """The decoder layer index of a module path (``model.layers.3.mlp`` → 3), None outside the layers."""
    m = LAYER_PATH.match(path)
    return int(m.group(1)) if m else None


def experts_path(layer: int) -> str:
    """The module path of layer ``layer``'s routed experts."""
    return f"model.layers.{layer}.mlp.{EXPERTS_ATTR}"
