"""The exported decoder's two KV-cache modes: ``dynamic`` (the default) and ``static``.

``dynamic``: ``past_key_values.{i}.key/.value [B, kv_heads, P, head_dim]`` hold exactly the ``P``
cached positions; ``present.{i}.* [B, kv_heads, P+S, head_dim]`` is a new tensor (past and this
step's keys/values concatenated); ``attention_mask [B, P+S]``.

``static`` (ONNX Runtime GenAI's ``past_present_share_buffer: true``): every past is one buffer
preallocated to the maximum length ``M``, ``[B, kv_heads, M, head_dim]``, and ``present`` *is*
that buffer (the client binds the same memory as input and output). ``attention_mask [B, T]``
covers the filled part: its length ``T`` is the number of slots in use after this step, so the
step writes its ``S`` new keys/values at slots ``P = T − S … T−1`` and attends over slots
``0 … T−1``; the rest of the buffer is neither read nor written. Padding is marked by zeros in
the mask, as in the dynamic mode.

The static mode is a wrapper around the *same* lowered graph (:class:`StaticCacheDecoder`): it
narrows each buffer to its filled part ``[:, :, :P]``, runs the dynamic decoder on that, and
writes the step's new entries into the buffer at ``P`` with an ``index_put`` (one ``ScatterND``
per tensor, indexed on the leading three axes, so it writes ``B·kv_heads·S`` rows of
``head_dim`` and moves nothing else). The attention, MoE and every other op are the dynamic
mode's, so the two modes compute the same numbers (checked by ``dsmoe-export --verify`` and the
tests); the ORT fusions (``MultiHeadAttention`` with past) apply to both.

A mask as long as the whole buffer (GenAI's graph-capture mode on GPUs, where the filled part is
marked only by the mask's values) is not this mode: ``T`` must be the filled length.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from dsmoe.errors import DsmoeError

KV_CACHE_MODES = ("dynamic", "static")
# the name of the past inputs' axis 2 in each mode (how a runner tells an export's mode);
# present's axis 2 is "total_sequence" (dynamic) or the same buffer axis (static)
PAST_AXIS = {"dynamic": "past_sequence", "static": "max_sequence"}
PRESENT_AXIS = {"dynamic": "total_sequence", "static": "max_sequence"}


def check_kv_cache(mode: str) -> str:
    if mode not in KV_CACHE_MODES:
        raise DsmoeError(f"unknown --kv-cache {mode!r} (supported: {', '.join(KV_CACHE_MODES)})")
    return mode


def flat_outputs(logits: torch.Tensor, present, router: dict | None = None) -> tuple:
    """``(logits, k0, v0, k1, ..., router outputs)``: the exported graph's output order (the
    router outputs of ``--router-stats`` graphs, ``{layer: {field: tensor}}``, in their order)."""
    extra = [t for fields in (router or {}).values() for t in fields.values()]
    return (logits, *[t for entry in present for t in entry], *extra)


class DynamicCacheDecoder(nn.Module):
    """The lowered graph with a flat ``(logits, k0, v0, k1, ...)`` output (past ``P`` slots long)."""

    def __init__(self, gm: GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, present, *router = self.gm(input_ids, attention_mask, position_ids, past_key_values)
        return flat_outputs(logits, present, router[0] if router else None)


class StaticCacheDecoder(nn.Module):
    """The lowered graph over preallocated buffers ``[B, heads, M, dim]`` (every entry of the
    cache layout: ``key``/``value``, or MLA's ``latent``): the mask's length ``T`` is the filled
    length after this step; returns every buffer with slots ``T−S … T−1`` written (the rest
    unchanged)."""

    def __init__(self, gm: GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        S = input_ids.shape[1]
        P = attention_mask.shape[1] - S
        # narrow (unlike a slice) has the exact length P, so the attention's shapes stay tied to
        # the mask's and the ORT attention fusion still applies
        past = [tuple(t.narrow(2, 0, P) for t in entry) for entry in past_key_values]
        logits, present, *router = self.gm(input_ids, attention_mask, position_ids, past)
        written = [tuple(_write(buf, new, P, S) for buf, new in zip(bufs, news))
                   for bufs, news in zip(past_key_values, present)]
        return flat_outputs(logits, written, router[0] if router else None)


def _write(buf: torch.Tensor, new: torch.Tensor, P: int, S: int) -> torch.Tensor:
    """``buf [B, heads, M, dim]`` with slots ``P … P+S−1`` set to the step's ``new[:, :, P:]``."""
    B, heads = buf.shape[:2]
    b = torch.arange(B, device=buf.device).view(B, 1, 1)
    h = torch.arange(heads, device=buf.device).view(1, heads, 1)
    s = (torch.arange(S, device=buf.device) + P).view(1, 1, S)
    return buf.index_put((b, h, s), new.narrow(2, P, S))


def decoder_module(gm: GraphModule, kv_cache: str) -> nn.Module:
    return StaticCacheDecoder(gm) if check_kv_cache(kv_cache) == "static" else DynamicCacheDecoder(gm)
