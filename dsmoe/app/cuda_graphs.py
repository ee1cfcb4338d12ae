"""CUDA graphs for the fused graph: a static-cache decoder and per-shape replay.

:class:`StaticDecoder` wraps a step function (the decoder signature of :mod:`dsmoe.ir`:
``step(input_ids, attention_mask, position_ids, past) -> (logits, present)``) with a preallocated
KV cache so that the decode step has fixed shapes and addresses, and on a GPU replays it from a
CUDA graph. :class:`CudaGraphed` replays any tensor function from one graph per input shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsmoe.cache import cache_layout
from dsmoe.config import DeepseekConfig
from dsmoe.errors import DsmoeError

Step = Callable[..., tuple[torch.Tensor, list]]


class StaticDecoder:
    """A step function over a preallocated KV cache: fixed shapes for the decode step, replayed
    from a CUDA graph on a GPU.

    The wrapped ``step`` (the fused graph) is called with the whole static cache as its past:
    ``[B, heads, max_len, dim]`` per layer and cache entry (``key``/``value`` or the MLA
    ``latent``, :mod:`dsmoe.cache`) and ``attention_mask [B, max_len + 1]`` that marks the filled
    slots and the new token; the step's own ``present`` (the cache with the new token's entries
    concatenated at index ``max_len``) is then written into slot ``P`` with ``index_copy_``.
    Every decode step therefore has the same shapes and tensor addresses, which is what
    CUDA-graph replay needs; attention scores over unfilled slots are masked out exactly
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
        self.present_views = True  # the present it returns is a view of self.cache (the engine clones what it keeps)
        if self.cuda_graph and self.device.type != "cuda":
            raise DsmoeError("CUDA-graph decode needs a CUDA device")
        self.cache = cache_layout(config).empty(self.B, dtype, self.device, length=self.L)  # one tuple per layer
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
        logits, present = self.step(self.ids, self.mask, self.pos, list(self.cache))
        for layer, new in zip(self.cache, present):
            for t, p in zip(layer, new):
                t.index_copy_(2, self.slot, p[:, :, self.L:])
        return logits

    def _capture(self):
        # A decode step is idempotent for fixed inputs (it writes slot P, which it does not
        # read), so the warm-up runs of the capture are harmless.
        self.graph, self.logits = capture_cuda_graph(self._decode, self.device)

    def _is_own(self, past, P: int) -> bool:
        return self.fill == P and all(p[0].data_ptr() == layer[0].data_ptr() for p, layer in zip(past, self.cache))

    def _load(self, past) -> None:
        for layer, given in zip(self.cache, past):
            for t, p in zip(layer, given):
                if p.data_ptr() != t.data_ptr():
                    t[:, :, :p.shape[2]].copy_(p)
        self.fill = past[0][0].shape[2] if past else 0

    def _views(self, n: int) -> list:
        return [tuple(t[:, :, :n] for t in layer) for layer in self.cache]


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
