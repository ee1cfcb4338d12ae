"""Benchmark suites: what is measured (a workload and its cases), independent of the backend.

- ``moe-layer``: one MoE layer (router + routed + shared experts) with random weights, fed
  ``x [T, H]`` for each T. The subject a backend compiles is :class:`LayerModule` (``mlp`` =
  one :class:`~dsmoe.model.DeepseekMoE`), whose module paths (``mlp.gate``, ``mlp.experts.N``)
  are what the passes match.
- ``model``: a reduced-depth model (real width and vocabulary) driven through the decoder-step
  signature of :func:`dsmoe.ir.capture`: prefill of S tokens from an empty cache, then N decode
  steps with the KV cache, teacher-forced with the tokens eager chose greedily (so every backend
  gets the same inputs). Decode latency is reported per token.

Each case carries the work it must do at least (:mod:`dsmoe.bench.limits`), counted from the
experts the eager router actually hit on that case's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from dsmoe.bench.limits import Work, model_step_work, moe_layer_work
from torch import nn

import dsmoe
from dsmoe.app.choices import SUITES  # noqa: F401  (its home is the light choices module; re-exported here)
from dsmoe.cache import cache_layout
from dsmoe.config import DeepseekConfig
from dsmoe.ir import DecoderStep
from dsmoe.model import DeepseekMoE, MoEGate

SEED = 0


@dataclass
class Case:
    name: str
    tokens: int
    run: Callable[[Callable], Any]  # run the case once on a backend's callable; returns its output
    work: Work
    per: int = 1                    # latency is divided by this (decode: per token)
    info: dict = field(default_factory=dict)
    # the work with the linears' weights at another size per element (a quantized backend's floor)
    work_at: Callable[[float], Work] | None = None


@dataclass
class Workload:
    suite: str
    source: str
    overrides: dict
    config: DeepseekConfig
    eager: nn.Module       # the reference subject (callable with the suite's signature)
    cases: list[Case]
    shapes: dict
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: dict = field(default_factory=dict)  # shared between backends (e.g. the exported program)
    prompt_ids: list[int] | None = None         # model suite: the prefill case's tokens (GenAI replays them)


class LayerModule(nn.Module):
    """One MoE layer as a module with a ``mlp`` child (``x [T,H] → y [T,H]``)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.mlp = DeepseekMoE(config)

    def forward(self, x):
        return self.mlp(x)


@torch.no_grad()
def random_layer(config: DeepseekConfig, seed: int = SEED) -> LayerModule:
    """A MoE layer with the reference init (normal(0, initializer_range)), deterministic per seed."""
    layer = LayerModule(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for _, p in layer.named_parameters():
        p.normal_(0.0, config.initializer_range, generator=g)
    return layer


def moe_layer_workload(source: str, overrides: dict, tokens: list[int], *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> Workload:
    config = dsmoe.load_config(source, overrides)
    device = torch.device(device)
    layer = dsmoe.cast_model(random_layer(config), dtype).to(device)
    cases = []
    for T in tokens:
        x = torch.randn(T, config.hidden_size, generator=torch.Generator().manual_seed(1000 + T)).to(device, dtype)
        with torch.no_grad():
            _, ids = layer.mlp.gate(x)
        hits = int(torch.unique(ids).numel())
        cases.append(Case(name=f"T={T}", tokens=T, run=_call_with(x),
                          work=moe_layer_work(config, T, hits, itemsize=dtype.itemsize), info={"hit_experts": hits}))
    E, H, I, K = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    shapes = {"source": source, "overrides": overrides, "H": H, "E": E, "K": K, "I": I,
              "I_shared": config.shared_intermediate_size, "tokens": tokens,
              "layer_params": sum(p.numel() for p in layer.parameters()),
              "routing": config.routing.as_kwargs()}
    return Workload("moe-layer", source, overrides, config, layer, cases, shapes, dtype=dtype, device=device)


def _call_with(*args):
    return lambda f: f(*args)


# ---- model suite ----------------------------------------------------------------------------

def model_workload(source: str, overrides: dict, prefill: int, decode: int, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Workload:
    device = torch.device(device)
    model = dsmoe.load(source, overrides=overrides, dtype=dtype, seed=SEED, device=device)
    config = model.config
    step = DecoderStep(model).eval()
    hits: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: hits.append(int(torch.unique(out[1]).numel())))
             for m in model.modules() if isinstance(m, MoEGate)]
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, config.vocab_size, (1, prefill), generator=g).to(device)
    empty = cache_layout(config).empty(1, dtype, device)
    prefill_args = (ids, torch.ones(1, prefill, dtype=torch.int64, device=device),
                    torch.arange(prefill, device=device).unsqueeze(0), empty)
    with torch.inference_mode():
        logits, cache = step(*prefill_args)
        prefill_hits, hits[:] = list(hits), []
        tokens, step_hits = [], []
        nxt, past = logits[:, -1:].argmax(-1), cache
        for i in range(decode):  # eager's greedy tokens: the inputs every backend is fed
            tokens.append(nxt)
            args = _decode_args(nxt, prefill + i, device)
            out, past = step(*args, past)
            step_hits.append(list(hits))
            hits[:] = []
            nxt = out[:, -1:].argmax(-1)
    for h in hooks:
        h.remove()
    cache = [tuple(t.clone() for t in layer) for layer in cache]

    def decode_work(weight_bytes: float | None = None) -> Work:
        total = Work(0.0, 0.0)
        for i, h in enumerate(step_hits):
            total = total + model_step_work(config, 1, prefill + i, h, itemsize=dtype.itemsize, weight_bytes=weight_bytes)
        return total.scaled(1 / decode)

    def prefill_work(weight_bytes: float | None = None) -> Work:
        return model_step_work(config, prefill, 0, prefill_hits, itemsize=dtype.itemsize, weight_bytes=weight_bytes)

    def run_decode(f):
        past, outs = cache, []
        for i, tok in enumerate(tokens):
            out, past = f(*_decode_args(tok, prefill + i, device), past)
            outs.append(out)
        return outs

    cases = [
        Case(name=f"prefill {prefill}", tokens=prefill, run=_call_with(*prefill_args), work=prefill_work(),
             info={"hit_experts": prefill_hits}, work_at=prefill_work),
        Case(name=f"decode ×{decode} (per token)", tokens=1, run=run_decode, work=decode_work(),
             per=decode, info={"steps": decode, "past_start": prefill,
                               "hit_experts_mean": [sum(c) / len(c) for c in zip(*step_hits)] if step_hits else []},
             work_at=decode_work),
    ]
    shapes = {"source": source, "overrides": overrides, "layers": config.num_hidden_layers,
              "moe_layers": config.moe_layers, "H": config.hidden_size, "V": config.vocab_size,
              "E": config.n_routed_experts, "K": config.num_experts_per_tok, "batch": 1,
              "prefill": prefill, "decode_steps": decode,
              "model_params": sum(p.numel() for p in model.parameters())}
    return Workload("model", source, overrides, config, step, cases, shapes, dtype=dtype, device=device,
                    prompt_ids=ids[0].tolist())


def quant_workload(source: str, overrides: dict, prefill: int, decode: int, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Workload:
    """The ``model`` suite's workload (same model, inputs and cases) for the quantized backends:
    eager fp32, ORT fp32, ORT int8/int4 (``dsmoe-export --quant``) and llama.cpp Q8_0/Q4_0."""
    w = model_workload(source, overrides, prefill, decode, device=device, dtype=dtype)
    w.suite = "quant"
    return w


def _decode_args(tok: torch.Tensor, pos: int, device: torch.device):
    return (tok.reshape(1, 1), torch.ones(1, pos + 1, dtype=torch.int64, device=device),
            torch.full((1, 1), pos, dtype=torch.int64, device=device))
