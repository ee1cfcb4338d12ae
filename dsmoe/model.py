"""The DeepSeekMoE reference model: eager PyTorch, Hugging Face module and key names.

Read it outer to inner, like the paper: a causal LM is embeddings → decoder layers → norm →
lm_head; a decoder layer is pre-norm attention then pre-norm MLP; the MLP is dense SwiGLU for the
first ``first_k_dense_replace`` layers and a DeepSeekMoE block after (router + fine-grained routed
experts + always-on shared experts). This is also the *eager baseline* every artifact is measured
against, so its MoE dispatch is the standard one (per hit expert: gather tokens, run the expert,
scatter-add the weighted output), as fast as transformers' own eager path.

Attention is multi-head (``model_type: deepseek``, DeepSeekMoE 16B) or Multi-head Latent Attention
(``deepseek_v2`` / ``deepseek_v3``: :class:`MultiHeadLatentAttention`, numerically what
transformers' DeepseekV2/V3 attention computes, YaRN RoPE from :mod:`dsmoe.rope`).

KV cache: a list with one tuple per layer in the layout of :func:`dsmoe.cache.cache_layout` —
``(key, value)`` ``[B, kv_heads, L, head_dim]`` for MHA, ``(latent,)`` ``[B, 1, L, kv_lora_rank +
qk_rope_head_dim]`` for MLA; ``forward(..., past_key_values=cache, use_cache=True)`` returns
``(logits, present)`` where ``present`` is the cache with this step's entries appended (the ONNX
Runtime GenAI layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import rope
from dsmoe.config import DeepseekConfig
from dsmoe.mla_config import LATENT_NORM_EPS
from dsmoe.routing import RoutingSpec, route

KVCache = list[tuple[torch.Tensor, ...]]


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ):
        """``input_ids [B,S]`` → ``logits [B,S,V]`` (and the new cache when ``use_cache``).

        ``attention_mask [B, past+S]`` is 1 for real tokens, 0 for padding; ``position_ids [B,S]``
        default to ``past + arange(S)``.
        """
        h, present = self.model(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(h)
        return (logits, present) if use_cache else logits


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekRotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        B, S = input_ids.shape
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=input_ids.device).unsqueeze(0).expand(B, S)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        mask = causal_mask(B, S, past, attention_mask, input_ids.device)
        present: KVCache = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, cos, sin, mask, None if past_key_values is None else past_key_values[i])
            present.append(kv)
        return self.norm(h), present


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config) if config.is_mla else DeepseekAttention(config)
        self.mlp = DeepseekMoE(config) if config.is_moe_layer(layer_idx) else DeepseekMLP(config)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_kv):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class DeepseekAttention(nn.Module):
    """Causal multi-head attention with rotate-half RoPE over the whole head_dim."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        H, nh, nkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(H, nh * d, bias=bias)
        self.k_proj = nn.Linear(H, nkv * d, bias=bias)
        self.v_proj = nn.Linear(H, nkv * d, bias=bias)
        self.o_proj = nn.Linear(nh * d, H, bias=bias)

    def forward(self, x, cos, sin, mask, past_kv):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        rep = self.num_heads // self.num_kv_heads
        kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.matmul(q, kr.transpose(2, 3)).float() * (1.0 / math.sqrt(self.head_dim))
        probs = torch.softmax(scores + mask, dim=-1).to(q.dtype)
        out = torch.matmul(probs, vr).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out), (k, v)


class MultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3) with the compressed-latent KV cache.

    Queries: ``q_proj`` (``q_lora_rank`` null, V2-Lite) or ``q_b_proj(q_a_layernorm(q_a_proj(x)))``,
    per head ``[q_nope (d_nope) ‖ q_rope (d_rope)]``. Keys and values come from one latent per
    token: ``kv_a_proj_with_mqa(x) = [c_KV (R) ‖ k_rope (d_rope)]``, ``c_KV`` normalized by
    ``kv_a_layernorm``, ``k_rope`` rotated and shared by every head; the cache keeps ``[c_KV ‖
    k_rope]`` (``[B, 1, L, R + d_rope]``, :mod:`dsmoe.cache`). :meth:`attend` expands it at every
    step, as transformers does: ``kv_b_proj(c_KV)`` gives each head's ``k_nope (d_nope)`` and ``v
    (d_v)``, key = ``[k_nope ‖ k_rope]``; softmax scale ``(d_nope + d_rope)^-0.5`` times the YaRN
    correction (:func:`dsmoe.rope.softmax_scale`). ``passes/absorb_mla.py`` rewrites :meth:`attend`
    into the weight-absorbed form (``dsmoe::mla_attention``), which reads the latent directly.
    """

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        H, nh = config.hidden_size, config.num_attention_heads
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = nh, config.q_lora_rank, config.kv_lora_rank
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.interleaved = config.rope_interleave
        self.softmax_scale = rope.softmax_scale(config.qk_head_dim, config.rope_scaling, config.max_position_embeddings)
        bias, dq = config.attention_bias, self.nope + self.rope
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekRMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, nh * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = DeepseekRMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, H, bias=bias)

    def forward(self, x, cos, sin, mask, past):
        B, S, _ = x.shape
        nh, R, dr = self.num_heads, self.kv_lora_rank, self.rope
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = torch.split(q.view(B, S, nh, self.nope + dr).transpose(1, 2), [self.nope, dr], dim=-1)
        c_kv, k_rope = torch.split(self.kv_a_proj_with_mqa(x), [R, dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).view(B, 1, S, R)
        q_rope = self._rotary(q_rope, cos, sin)
        k_rope = self._rotary(k_rope.view(B, 1, S, dr), cos, sin)
        latent = torch.cat([c_kv, k_rope], dim=-1)  # [B, 1, S, R + d_rope]
        if past is not None:
            latent = torch.cat([past[0], latent], dim=2)
        return self.o_proj(self.attend(q_nope, q_rope, latent, mask)), (latent,)

    def attend(self, q_nope, q_rope, latent, mask):
        """Expanded attention over the latent cache: ``q_nope [B,nh,S,d_nope], q_rope [B,nh,S,d_rope],
        latent [B,1,T,R+d_rope], mask [B,1,S,T]`` → ``[B, S, nh·d_v]``."""
        B, _, T, _ = latent.shape
        S, nh = q_nope.shape[2], self.num_heads
        c_kv, k_rope = torch.split(latent, [self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, T, nh, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, nh, T, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        scores = torch.matmul(q, k.transpose(2, 3)).float() * self.softmax_scale
        probs = torch.softmax(scores + mask, dim=-1).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(B, S, nh * self.v_dim)

    def _rotary(self, x, cos, sin):
        """RoPE on the rope part; interleaved checkpoints pair dims (2i, 2i+1): de-interleave to
        rotate-half order first (DeepSeek's own code; transformers' V3 interleaved RoPE)."""
        if self.interleaved:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return apply_rotary(x, cos, sin)


class DeepseekMoE(nn.Module):
    """DeepSeekMoE block: ``Σ_k w_k · expert_{id_k}(x) + shared_experts(x)``."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(
            DeepseekMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            DeepseekMLP(config, config.shared_intermediate_size) if config.n_shared_experts else None
        )

    def forward(self, x):
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        w_TK, ids_TK = self.gate(x_TH)
        y = self.routed(x_TH, w_TK, ids_TK).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TH)
        return y.view(shape)

    def routed(self, x_TH, w_TK, ids_TK):
        """Eager dispatch: for each expert that got tokens, gather them, run it, scatter-add
        the routing-weighted output (accumulated in fp32).

        Under ``torch.export`` the hit set is data, so every expert is traced, in the dense
        masked form ``y += expert_e(x) · Σ_k w[:, k]·[ids[:, k] = e]`` (same values: a token's
        top-K ids are distinct). It has no data-dependent shapes, which makes capture 2–3× faster
        than tracing the gather/scatter form (no unbacked sizes to reason about); ``outline_moe``
        replaces the whole region with one ``dsmoe::moe`` anyway.
        """
        y = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        if torch.compiler.is_exporting():
            for e in range(self.num_experts):
                w_e = (w_TK * (ids_TK == e)).sum(dim=-1, keepdim=True)
                y = y + self.experts[e](x_TH).float() * w_e
            return y
        experts = torch.bincount(ids_TK.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        for e in experts:
            tok, k = torch.where(ids_TK == e)
            out = self.experts[e](x_TH[tok]).float() * w_TK[tok, k].unsqueeze(-1)
            y.index_add_(0, tok, out)
        return y


class MoEGate(nn.Module):
    """The router: ``weight [E,H]`` (+ ``e_score_correction_bias [E]`` for ``noaux_tc``);
    ``x [T,H]`` → ``(weights [T,K] fp32, ids [T,K] int32)`` by :func:`dsmoe.routing.route`."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.spec: RoutingSpec = config.routing
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if self.spec.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TH):
        return route(x_TH, self.weight, self.e_score_correction_bias, **self.spec.as_kwargs())


class DeepseekMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` (dense layers, each expert, shared experts)."""

    def __init__(self, config: DeepseekConfig, intermediate_size: int | None = None):
        super().__init__()
        H, I = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepseekRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DeepseekRotaryEmbedding(nn.Module):
    """``position_ids [B,S]`` → ``(cos, sin) [B,1,S,d]`` over the rotary width (whole head for MHA,
    the rope part for MLA), YaRN-scaled when ``rope_scaling`` says so (:func:`dsmoe.rope.inv_freq`)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.dim, self.theta = config.rotary_dim, config.rope_theta
        self.rope_scaling, self.max_positions = config.rope_scaling, config.max_position_embeddings
        inv_freq, self.attention_factor = rope.inv_freq(self.dim, self.theta, self.rope_scaling, self.max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids, dtype):
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [B,S,d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:  # YaRN's mscale ratio multiplies cos and sin
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)  # [B,1,S,d]

    def rebuild(self, device) -> None:
        self.inv_freq = rope.inv_freq(self.dim, self.theta, self.rope_scaling, self.max_positions, device=device)[0]


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def causal_mask(B: int, S: int, past: int, attention_mask, device) -> torch.Tensor:
    """Additive fp32 mask ``[B,1,S,past+S]``: query i sees cache slots j <= past+i that are not
    padding. Masked entries get the most negative fp32 value (not −inf, so a fully padded row
    stays finite)."""
    q = torch.arange(S, device=device).unsqueeze(-1) + past
    kv = torch.arange(past + S, device=device).unsqueeze(0)
    allowed = (kv <= q).unsqueeze(0).unsqueeze(0)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=torch.float32, device=device)
    neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32, device=device)
    return torch.where(allowed, zero, neg)


@torch.no_grad()
def init_weights(model: DeepseekForCausalLM, seed: int = 0) -> DeepseekForCausalLM:
    """Deterministic random init (normal(0, initializer_range), norms at 1, biases 0).

    Draws on a private generator in a fixed parameter order, so a seed gives the same weights
    whatever else the process did. The generator lives on the parameters' device (a model built
    on a GPU is filled there, at HBM speed; its draws differ from the CPU's for the same seed).
    """
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        p.copy_(init_value(name, p.shape, g, std, device))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(init_value(name, b.shape, g, std, device))
    return model


def init_value(name: str, shape, g: torch.Generator, std: float, device="cpu") -> torch.Tensor:
    """The initial fp32 value of parameter (or routing-bias buffer) ``name``: norms 1, biases 0,
    the routing bias normal(0, 0.01), every other weight normal(0, std), drawn from ``g``. The one
    rule :func:`init_weights` and the layer-by-layer checkpoint writer (:mod:`dsmoe.streaming`)
    share: the same draws in the same order give the same weights."""
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=g, dtype=torch.float32, device=device) * 0.01
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float32, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return torch.randn(shape, generator=g, dtype=torch.float32, device=device) * std


def rebuild_rotary(model: nn.Module) -> None:
    """Recompute the non-persistent rotary buffers (absent from checkpoints and meta-built models)."""
    for mod in model.modules():
        if isinstance(mod, DeepseekRotaryEmbedding):
            mod.rebuild(mod.inv_freq.device if mod.inv_freq.device.type != "meta" else "cpu")
