"""Running a model: architecture facts (``dsmoe info``), the fused backend, greedy generation.

A *step function* has the decoder signature of :mod:`dsmoe.ir`:
``step(input_ids, attention_mask, position_ids, past) -> (logits, present)``; the eager model, the
fused graph and the ONNX Runtime session (``dsmoe.export``) all provide one, so
:func:`greedy_generate` is written once. :class:`StaticDecoder` wraps a step function with a
preallocated KV cache so that the decode step has fixed shapes and addresses, and on a GPU
replays it from a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError

Step = Callable[..., tuple[torch.Tensor, list]]
BACKENDS = ("eager", "fused", "ort")


@dataclass
class Architecture:
    layers: int
    dense_layers: list[int]
    moe_layers: list[int]
    routed_experts: int
    shared_experts: int
    experts_per_token: int
    params_total: int
    params_active: int
    params_per_expert: int

    def bytes(self, n: int) -> dict[str, int]:
        return {"fp32": 4 * n, "fp16/bf16": 2 * n, "fp8/int8": n}


def architecture(c: DeepseekConfig) -> Architecture:
    """Parameter counts from the config alone (no weights needed), per the spec's layout."""
    H, V = c.hidden_size, c.vocab_size
    attn = H * c.num_attention_heads * c.head_dim * 2 + H * c.num_key_value_heads * c.head_dim * 2
    if c.attention_bias:
        attn += 2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
    dense_mlp = 3 * H * c.intermediate_size
    expert = 3 * H * c.moe_intermediate_size if c.has_moe else 0
    shared = 3 * H * c.shared_intermediate_size
    router = (c.n_routed_experts or 0) * H
    moe_layers = c.moe_layers
    dense_layers = [i for i in range(c.num_hidden_layers) if i not in moe_layers]
    per_layer_common = attn + 2 * H
    total = V * H * (1 if c.tie_word_embeddings else 2) + H
    total += c.num_hidden_layers * per_layer_common + len(dense_layers) * dense_mlp
    total += len(moe_layers) * ((c.n_routed_experts or 0) * expert + shared + router)
    inactive = len(moe_layers) * ((c.n_routed_experts or 0) - (c.num_experts_per_tok or 0)) * expert
    return Architecture(c.num_hidden_layers, dense_layers, moe_layers, c.n_routed_experts or 0,
                        c.n_shared_experts or 0, c.num_experts_per_tok or 0, total, total - inactive, expert)


def eager_step(model: torch.nn.Module) -> Step:
    def step(input_ids, attention_mask, position_ids, past):
        return model(input_ids, attention_mask, position_ids, past, use_cache=True)
    return step


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``/``cuda``/``cuda:N`` → a device that exists here, or one clear :class:`DsmoeError`."""
    try:
        dev = torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        raise DsmoeError(f"unknown device {name!r} (cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DsmoeError(f"unsupported device {name!r} (cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise DsmoeError(f"--device {name}: no CUDA device here (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DsmoeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def require_cuda_kernels() -> None:
    """Register the dsmoe CUDA kernels or raise :class:`DsmoeError` saying why they cannot be."""
    from dsmoe.plugins import cuda_kernels_status, register_cuda_kernels

    if not register_cuda_kernels():
        raise DsmoeError(f"the dsmoe CUDA kernels are unavailable: {cuda_kernels_status()[1]}")


def fused_step(model: torch.nn.Module, *, fold_shared_experts: bool = False) -> Step:
    """Capture the model and run the pass pipeline; the fused graph is the step function.

    The graph runs where the model is: on a GPU, call :func:`require_cuda_kernels` first so that
    ``dsmoe::route``/``dsmoe::moe`` dispatch to the plugins' kernels.
    """
    from dsmoe.ir import capture
    from dsmoe.passes.context import PassContext
    from dsmoe.passes.pipeline import run_pipeline

    gm, _ = run_pipeline(capture(model), PassContext(fold_shared_experts=fold_shared_experts))
    return gm


def empty_cache(config: DeepseekConfig, batch: int, dtype: torch.dtype, device="cpu") -> list:
    shape = (batch, config.num_key_value_heads, 0, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


@torch.no_grad()
def greedy_generate(step: Step, config: DeepseekConfig, prompt_ids: list[int], max_new_tokens: int, *,
                    dtype: torch.dtype = torch.float32, stop_at_eos: bool = False,
                    device: str | torch.device = "cpu") -> list[int]:
    """Greedy decoding with the KV cache: one prefill step, then one step per new token."""
    if not prompt_ids:
        raise DsmoeError("the prompt is empty")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise DsmoeError(f"prompt id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    past = empty_cache(config, 1, dtype, device)
    out: list[int] = []
    pos = 0
    for _ in range(max_new_tokens):
        S = ids.shape[1]
        mask = torch.ones(1, pos + S, dtype=torch.int64, device=device)
        position_ids = torch.arange(pos, pos + S, dtype=torch.int64, device=device).unsqueeze(0)
        logits, past = step(ids, mask, position_ids, list(past))
        nxt = int(torch.as_tensor(logits)[0, -1].argmax())
        out.append(nxt)
        pos += S
        ids = torch.tensor([[nxt]], dtype=torch.int64, device=device)
        if stop_at_eos and nxt == config.eos_token_id:
            break
    return out


class StaticDecoder:
    """A step function over a preallocated KV cache: fixed shapes for the decode step, replayed
    from a CUDA graph on a GPU.

    The wrapped ``step`` (the fused graph) is called with the whole static cache as its past:
    ``past [B, kv_heads, max_len, head_dim]`` per layer and ``attention_mask [B, max_len + 1]``
    that marks the filled slots and the new token; the step's own ``present`` (the cache with the
    new token's key/value concatenated at index ``max_len``) is then written into slot ``P`` with
    ``index_copy_``. Every decode step therefore has the same shapes and tensor addresses, which
    is what CUDA-graph replay needs; attention scores over unfilled slots are masked out exactly
    as padding is. Cost: the step reads (and its concatenation copies) ``max_len`` cache slots,
    not ``P``; size ``max_len`` to the sequence (:func:`static_length`).

    Calls keep the step signature: a call with S > 1 (prefill) or another batch size runs the
    wrapped step as is and loads its present into the static cache; a decode call (S = 1) whose
    ``past`` is not the cache this object returned last is copied in first. The returned present
    is a view of the static cache (valid until the next call).
    """

    def __init__(self, step: Step, config: DeepseekConfig, *, max_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 cuda_graph: bool | None = None):
        self.step, self.L, self.B = step, int(max_len), int(batch)
        self.device = torch.device(device)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise DsmoeError("CUDA-graph decode needs a CUDA device")
        shape = (self.B, config.num_key_value_heads, self.L, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        self.ids = torch.zeros(self.B, 1, dtype=torch.int64, device=self.device)
        self.pos = torch.zeros(self.B, 1, dtype=torch.int64, device=self.device)
        self.mask = torch.zeros(self.B, self.L + 1, dtype=torch.int64, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.fill = -1           # slots of the cache this object returned last (-1: none)
        self.graph = None
        self.logits = None       # the graph's output buffer
        self.replays = 0

    def __call__(self, input_ids, attention_mask, position_ids, past):
        B, S = input_ids.shape
        P = past[0][0].shape[2] if past else 0
        if P + S > self.L:
            raise DsmoeError(f"sequence of {P + S} tokens exceeds the static cache ({self.L}); "
                             f"build the decoder with a larger max_len")
        if B != self.B:  # not this cache's batch size: run the step as is
            return self.step(input_ids, attention_mask, position_ids, past)
        if S != 1:  # prefill: dynamic shapes, then keep the result
            logits, present = self.step(input_ids, attention_mask, position_ids, past)
            self._load(present)
            return logits, self._views(P + S)
        if not self._is_own(past, P):
            self._load(past)
        self.ids.copy_(input_ids)
        self.pos.copy_(position_ids)
        self.mask[:, :P].copy_(attention_mask[:, :P])
        self.mask[:, P:self.L].zero_()
        self.mask[:, self.L:].copy_(attention_mask[:, P:])
        self.slot.fill_(P)
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            self.replays += 1
            logits = self.logits.clone()  # the buffer is overwritten by the next replay
        else:
            logits = self._decode()
        self.fill = P + 1
        return logits, self._views(P + 1)

    def _decode(self):
        logits, present = self.step(self.ids, self.mask, self.pos, list(zip(self.k, self.v)))
        for k, v, (pk, pv) in zip(self.k, self.v, present):
            k.index_copy_(2, self.slot, pk[:, :, self.L:])
            v.index_copy_(2, self.slot, pv[:, :, self.L:])
        return logits

    def _capture(self):
        # A decode step is idempotent for fixed inputs (it writes slot P, which it does not
        # read), so the warm-up runs of the capture are harmless.
        self.graph, self.logits = capture_cuda_graph(self._decode, self.device)

    def _is_own(self, past, P: int) -> bool:
        return P == self.fill and all(pk.data_ptr() == k.data_ptr() for (pk, _), k in zip(past, self.k))

    def _load(self, past) -> None:
        for k, v, (pk, pv) in zip(self.k, self.v, past):
            n = pk.shape[2]
            if pk.data_ptr() != k.data_ptr():
                k[:, :, :n].copy_(pk)
                v[:, :, :n].copy_(pv)
        self.fill = past[0][0].shape[2] if past else 0

    def _views(self, n: int) -> list:
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.k, self.v)]


def static_length(tokens: int, multiple: int = 64) -> int:
    """The static cache length for a sequence of ``tokens``: rounded up to ``multiple``."""
    return max(multiple, -(-tokens // multiple) * multiple)


def capture_cuda_graph(fn: Callable[[], object], device, *, warmup: int = 2):
    """``(graph, outputs)``: ``fn()`` captured into a CUDA graph after ``warmup`` runs on a side
    stream (kernel builds and module loads, cuBLAS handles and the allocator settle there, as
    capture requires). Replaying the graph recomputes ``outputs`` in place."""
    device = torch.device(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class CudaGraphed:
    """``fn(*tensors)`` replayed from one CUDA graph per input signature (shapes, dtypes): the
    inputs are copied into the graph's static buffers, the outputs cloned out. For callables
    whose launches do not depend on input *values* beyond what the kernels read on the device
    (the fused MoE layer: ``dsmoe::route`` and ``dsmoe::moe`` plan from shapes only)."""

    def __init__(self, fn: Callable, *, max_graphs: int = 32):
        self.fn, self.max_graphs = fn, max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.replays = 0

    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                raise DsmoeError(f"more than {self.max_graphs} input shapes: CUDA graphs are per shape")
            static = [a.clone() for a in args]
            graph, out = capture_cuda_graph(lambda: self.fn(*static), args[0].device)
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        self.replays += 1
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
