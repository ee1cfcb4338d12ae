"""The llama.cpp baseline's model: a GGUF (architecture ``deepseek``) written from the same weights.

:func:`write_gguf` streams a checkpoint directory, or a preset's seeded random weights (drawn part
by part exactly as ``dsmoe.load("preset:NAME", seed=SEED)`` draws them, :mod:`dsmoe.streaming`),
into a GGUF file that llama.cpp loads as DeepSeekMoE: the hyperparameter keys and tensor names of
llama.cpp's own converter (``convert_hf_to_gguf.py``, ``DeepseekModel``; names from the gguf
package's tensor map), q/k rows permuted to ggml's RoPE pair layout as that converter does, the
routed experts stacked per layer; the checkpoint's byte-level BPE tokenizer when it has one
(:mod:`dsmoe.bench.gguf_vocab`, for ``llama-perplexity``), else no tokenizer
(``tokenizer.ggml.model = "none"`` with the vocabulary size: llama-bench draws random ids).

Weights are F32 (every tensor), or Q8_0 or Q4_0 (:func:`dsmoe.quant.ggml_quantize`, byte for byte ggml's reference
quantizers) for every linear — attention, dense MLP, routed and shared experts, ``output`` —
and F32 for the embeddings, the router and the norms, which is what dsmoe's ``--quant`` keeps
in full precision too. One part in fp32 is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from dsmoe.bench.gguf_vocab import add_tokenizer

import dsmoe
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError
from dsmoe.quant import GGML_BLOCK, GGML_BLOCK_BYTES, GGML_TYPES, ggml_quantize
from dsmoe.streaming import layer_of, part_names, part_shapes, random_parts, read_part


def _gguf():
    import gguf  # lazy: optional dependency (the llama.cpp baseline only)

    return gguf


def check_supported(config: DeepseekConfig) -> None:
    """llama.cpp's ``deepseek`` architecture routes by softmax top-k with raw (unnormalized,
    unscaled) weights and has no attention bias: refuse what it would compute differently."""
    r = config.routing
    if (r.scoring, r.topk_method, r.norm_topk_prob) != ("softmax", "greedy", False) or (r.scaled and r.scaling != 1.0):
        raise DsmoeError("the GGUF baseline supports DeepSeekMoE (V1) routing only: softmax greedy, "
                         f"norm_topk_prob false, no scaling (this config: {r})")
    if config.moe_layer_freq != 1:
        raise DsmoeError("llama.cpp's deepseek architecture has dense layers only before the MoE ones (moe_layer_freq 1)")
    if config.attention_bias or config.tie_word_embeddings:
        raise DsmoeError("the GGUF baseline writes untied embeddings without attention biases")


def source_parts(source: str, config: DeepseekConfig, *, seed: int = 0) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(part, {checkpoint key: fp32 tensor})`` in model order, from a checkpoint or a preset."""
    if dsmoe.is_preset(source):
        yield from ((p, t) for p, t in random_parts(config, seed) if p != "biases")
    else:
        for part in part_names(config):
            yield part, read_part(source, config, part)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows → ggml's adjacent-pair RoPE layout (the converter's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(config: DeepseekConfig, part: str, sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """A part's tensors under llama.cpp's names, in fp32, experts stacked ``[E, N, K]``."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK, config.num_hidden_layers)
    i = layer_of(part)
    out = []
    if i is not None and config.is_moe_layer(i):
        prefix = f"model.layers.{i}.mlp.experts"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            stacked = torch.stack([sd.pop(f"{prefix}.{e}.{proj}.weight") for e in range(config.n_routed_experts)])
            out.append((names.get_name(f"{prefix}.{proj}.weight", try_suffixes=(".weight",)), stacked))
    for key, t in sd.items():
        if key.endswith("self_attn.q_proj.weight"):
            t = _permute(t, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            t = _permute(t, config.num_key_value_heads)
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:
            raise DsmoeError(f"no GGUF name for {key}")
        out.append((name, t))
    return out


def _quantized(name: str, t: torch.Tensor, qtype: str) -> bool:
    return qtype != "F32" and t.dim() >= 2 and not name.startswith("token_embd") and "ffn_gate_inp" not in name


def _encode(name: str, t: torch.Tensor, qtype: str) -> np.ndarray:
    if _quantized(name, t, qtype):
        return ggml_quantize(t, qtype).numpy()
    return t.float().contiguous().numpy()


def write_gguf(source: str, path: str | Path, *, qtype: str = "Q4_0", overrides: dict | None = None,
               seed: int = 0, placeholder_vocab: bool = False) -> dict:
    """Write ``source`` as a GGUF of ``qtype``; returns ``{"path", "bytes", "tensors"}``.
    ``placeholder_vocab``: a SentencePiece-type vocabulary of made-up pieces (``<unk>``, ``<s>``,
    ``</s>``, ``<t3>``…) instead of none, for ``llama-server`` (which must detokenize what it
    streams); the weights and what they compute are the same."""
    gguf = _gguf()
    if qtype not in (*GGML_TYPES, "F32"):
        raise DsmoeError(f"unsupported GGUF type {qtype!r} (supported: {', '.join(GGML_TYPES)}, F32)")
    config = dsmoe.load_config(source, overrides)
    config.validate()
    check_supported(config)
    raw = getattr(gguf.GGMLQuantizationType, qtype)
    w = gguf.GGUFWriter(str(path), arch="deepseek")
    _metadata(w, config, qtype, placeholder_vocab)
    if not placeholder_vocab and not add_tokenizer(w, source, config):  # the checkpoint's own tokenizer, if any
        w.add_tokenizer_model("none")
    # tensor infos first (shapes from the config alone), then the data part by part, same order
    meta = {p: {k: torch.empty(s, device="meta") for k, s in part_shapes(config, p).items()} for p in part_names(config)}
    order = []
    for part in part_names(config):
        for name, t in gguf_tensors(config, part, dict(meta[part])):
            if _quantized(name, t, qtype):
                shape = (*t.shape[:-1], t.shape[-1] // GGML_BLOCK * GGML_BLOCK_BYTES[qtype])
                w.add_tensor_info(name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=raw)
            else:
                w.add_tensor_info(name, tuple(t.shape), np.dtype(np.float32), t.numel() * 4)
            order.append(name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    written = []
    for part, sd in source_parts(str(source), config, seed=seed):
        for name, t in gguf_tensors(config, part, sd):
            w.write_tensor_data(_encode(name, t, qtype))
            written.append(name)
    w.close()
    if written != order:
        raise DsmoeError("GGUF tensors were written in another order than declared")
    return {"path": str(path), "bytes": Path(path).stat().st_size, "tensors": len(written), "type": qtype}


def _metadata(w, config: DeepseekConfig, qtype: str, placeholder_vocab: bool = False) -> None:
    """The keys llama.cpp's converter writes for ``DeepseekForCausalLM``."""
    gguf = _gguf()
    w.add_name("dsmoe-export")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_expert_count(config.n_routed_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_leading_dense_block_count(config.first_k_dense_replace)
    w.add_vocab_size(config.vocab_size)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_weights_scale(1.0)
    w.add_expert_shared_count(config.n_shared_experts or 0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    if not placeholder_vocab:
        return
    V = config.vocab_size
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([2, 3, 3] + [1] * (V - 3))  # unknown, control, control, normal
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
