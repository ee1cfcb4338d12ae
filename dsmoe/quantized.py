"""The quantized reference model: the eager model with its linears replaced by quantized ones.

:func:`quantized_reference` is "dsmoe's own dequantized model": every ``nn.Linear`` the scheme
covers becomes a :class:`QuantLinear` holding the codes and scales of :func:`dsmoe.quant.quantize`
and computing :func:`dsmoe.quant.qlinear` (with the int8 activation quantization of the ``ort``
target's kernels when the scheme says so). A quantized ONNX export must agree with it to fp32
tolerance; the unquantized model is what the accuracy report compares both against.

Scopes: ``all`` quantizes every linear — attention projections, ``lm_head``, and the linears of
every SwiGLU MLP (routed experts, shared experts, dense MLPs); ``experts`` only the MLPs. The
router (``mlp.gate``, not an ``nn.Linear``) and the embeddings stay in full precision, and so does
MLA's ``kv_b_proj``: the fused graph never runs it as a linear (``absorb_mla`` splits it into the
per-head matrices of ``dsmoe::mla_attention``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dsmoe.contract import EXPERTS_ATTR, GATED_MLP, MOE_BLOCK
from dsmoe.quant import QuantizedTensor, QuantScheme, qlinear, quantize


class QuantLinear(nn.Module):
    """``y = x·ŵᵀ (+ b)`` with ``ŵ`` block-quantized (see :func:`dsmoe.quant.qlinear`)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, *, act_quant: bool):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits, self.block_size, self.act_quant = qt.bits, qt.block_size, act_quant
        self.register_buffer("codes", qt.codes)
        self.register_buffer("scales", qt.scales)
        self.register_buffer("zero_points", qt.zero_points)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def qt(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.scales, self.zero_points, self.bits, self.block_size)

    def forward(self, x):
        return qlinear(x, self.qt, self.bias, act_quant=self.act_quant)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"block {self.block_size}, act_quant={self.act_quant}")


# linears that stay in full precision in every scope (see the module docstring)
FULL_PRECISION = ("kv_b_proj",)


def linears_in_scope(model: nn.Module, scope: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every ``nn.Linear`` the scope quantizes."""
    out = []
    for parent in model.modules():
        in_mlp = type(parent).__name__ == GATED_MLP
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and (scope == "all" or in_mlp) and name not in FULL_PRECISION:
                out.append((parent, name, child))
    return out


@torch.no_grad()
def quantized_reference(model: nn.Module, scheme: QuantScheme, config=None) -> nn.Module:
    """A copy of ``model`` whose in-scope linears are :class:`QuantLinear` (the original is left
    as it is; the copy shares every other parameter with it, so it costs only the codes).
    ``config``: the model's (default ``model.config``; a streamed layer has none of its own)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    ref = copy.deepcopy(model, memo)
    config = config or getattr(model, "config", None)
    routed = {id(m) for mod in ref.modules() if type(mod).__name__ == MOE_BLOCK for m in getattr(mod, EXPERTS_ATTR)}
    for parent, name, lin in linears_in_scope(ref, scheme.scope):
        if id(parent) in routed:  # one QMoE node per layer: fc1 (K = H) and fc2 (K = I) share a block size
            block = scheme.block_for(config.hidden_size, config.moe_intermediate_size)
        else:
            block = scheme.block_for(lin.in_features)
        qt = quantize(lin.weight, scheme.bits, block, symmetric=scheme.symmetric)
        setattr(parent, name, QuantLinear(qt, lin.bias, act_quant=scheme.act_quant))
    return ref.eval()


def quantized_dims(config, scope: str) -> dict[str, int]:
    """The input dimensions a scheme cuts into blocks (what ``--block-size`` must divide)."""
    dims = {"hidden_size": config.hidden_size}
    if config.has_moe:
        dims["moe_intermediate_size"] = config.moe_intermediate_size
        if config.n_shared_experts:
            dims["shared experts' width"] = config.shared_intermediate_size
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        dims["intermediate_size"] = config.intermediate_size
    if scope == "all" and config.is_mla:  # q_a/kv_a take hidden_size; q_b, kv_b and o_proj these
        if config.q_lora_rank:
            dims["q_lora_rank"] = config.q_lora_rank
        dims["attention width (num_attention_heads × v_head_dim)"] = config.num_attention_heads * config.v_head_dim
    elif scope == "all":
        dims["attention width (num_attention_heads × head_dim)"] = config.num_attention_heads * config.head_dim
    return dims
