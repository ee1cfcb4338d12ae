"""Expert-parallel dispatch and combine on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

One MoE layer on rank ``r`` of ``N`` (shape letters: T tokens here, K slots per token, H hidden,
S slots this rank sends, R slots it receives):

``a2a`` (data-parallel attention, the default: each rank decodes its own sequences)
    1. *dispatch*: each (token, slot) pair goes to the rank holding its expert (a replicated expert:
       replica ``(token + r) mod copies``); pairs sorted by destination (the permutation is kept),
       the N send counts exchanged first (``all_to_all_single`` of N int64), then the rows
       ``x [S,H]`` and their ``(weight, local expert id)`` ``[S,2]`` fp32 with uneven splits.
    2. *local experts*: ``dsmoe::moe`` with K=1 on the R received rows (the rank's experts only).
    3. *combine*: the weighted outputs ``[R,H]`` travel back by the reverse ``all_to_all_single``
       and are summed per token in fp32 (``index_add`` through the kept permutation).

``allreduce`` (replicated attention: every rank runs the same tokens)
    every rank computes its experts' share of every token's slots, then one ``all_reduce`` (sum,
    fp32) of ``[T,H]``; no dispatch traffic, but attention and the KV cache are replicated.

The process group is an argument (:class:`ExpertComm`), never a global; every collective is
timed out by the group's timeout (``init_process_group(timeout=...)``). Bytes each collective
moves are counted from the tensors' sizes (what ``dsmoe plan``'s formulas are checked against).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

MODES = ("a2a", "allreduce")


@dataclass
class Traffic:
    """Bytes handed to collectives by this rank (``to_self``: the part an all-to-all keeps local)."""

    dispatch: int = 0
    combine: int = 0
    counts: int = 0
    to_self: int = 0
    allreduce: int = 0
    slots: int = 0
    slots_remote: int = 0
    calls: int = 0

    def total(self) -> int:
        return self.dispatch + self.combine + self.counts + self.allreduce


@dataclass
class ExpertComm:
    """The process group and what the dispatch/combine of every layer share."""

    group: object
    mode: str = "a2a"
    traffic: Traffic = field(default_factory=Traffic)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"expert-parallel mode must be one of {MODES}, got {self.mode!r}")
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)


class Dispatch(nn.Module):
    """Step 1: ``(x [T,H], weights [T,K], ids [T,K])`` → ``(rows [R,H], weights [R,1] fp32, local ids
    [R,1] int32, handle)``; ``handle`` is what :class:`Combine` needs to undo the permutation."""

    def __init__(self, comm: ExpertComm, replicas: list[list[tuple[int, int]]]):
        super().__init__()
        self.comm = comm
        E, most = len(replicas), max(len(c) for c in replicas)
        rank_of = torch.zeros(E, most, dtype=torch.int64)
        local_of = torch.zeros(E, most, dtype=torch.int64)
        for e, copies in enumerate(replicas):
            for j in range(most):
                rank_of[e, j], local_of[e, j] = copies[j % len(copies)]
        # plain attributes, not buffers: tables, not weights (graph cleanup drops buffers no node reads)
        self.rank_of, self.local_of = rank_of, local_of
        self.copies = torch.tensor([len(c) for c in replicas])

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor):
        c = self.comm
        T, K = ids.shape
        if self.copies.device != x.device:
            self.rank_of, self.local_of, self.copies = (t.to(x.device) for t in (self.rank_of, self.local_of, self.copies))
        e = ids.reshape(-1).long()
        tok = torch.arange(T * K, device=x.device) // K
        j = (tok + c.rank) % self.copies[e]
        dest, local = self.rank_of[e, j], self.local_of[e, j]
        w = weights.reshape(-1).float()
        if c.mode == "allreduce":
            mine = (dest == c.rank).nonzero().squeeze(1)
            t = tok[mine]
            return (x.index_select(0, t), w[mine].unsqueeze(1), local[mine].to(torch.int32).unsqueeze(1),
                    (t, T, None, None))
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=c.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=c.group)  # split sizes first
        send_l, recv_l = send.tolist(), recv.tolist()
        rows = x.index_select(0, tok[order])
        meta = torch.stack([w[order], local[order].float()], dim=1)  # ids < 2**24: exact in fp32
        rx = x.new_empty((sum(recv_l), x.shape[1]))
        rmeta = meta.new_empty((sum(recv_l), 2))
        dist.all_to_all_single(rx, rows, recv_l, send_l, group=c.group)
        dist.all_to_all_single(rmeta, meta, recv_l, send_l, group=c.group)
        row_b, meta_b = x.shape[1] * x.element_size(), 2 * 4
        tr = c.traffic
        tr.counts += send.numel() * send.element_size()
        tr.dispatch += T * K * (row_b + meta_b)
        tr.to_self += send_l[c.rank] * (row_b + meta_b)
        tr.slots += T * K
        tr.slots_remote += T * K - send_l[c.rank]
        tr.calls += 1
        return rx, rmeta[:, :1], rmeta[:, 1:].to(torch.int32), (tok[order], T, send_l, recv_l)


class Combine(nn.Module):
    """Step 3: the local experts' weighted outputs ``[R,H]`` → ``y [T,H]`` in their dtype."""

    def __init__(self, comm: ExpertComm):
        super().__init__()
        self.comm = comm

    def forward(self, y_recv: Tensor, handle) -> Tensor:
        c = self.comm
        tok, T, send_l, recv_l = handle
        H = y_recv.shape[1]
        if c.mode == "allreduce":
            y = torch.zeros((T, H), dtype=torch.float32, device=y_recv.device).index_add_(0, tok, y_recv.float())
            dist.all_reduce(y, group=c.group)
            c.traffic.allreduce += y.numel() * y.element_size()
            c.traffic.slots += int(tok.numel())
            c.traffic.calls += 1
            return y.to(y_recv.dtype)
        back = y_recv.new_empty((sum(send_l), H))
        dist.all_to_all_single(back, y_recv.contiguous(), send_l, recv_l, group=c.group)
        c.traffic.combine += back.numel() * back.element_size()
        c.traffic.to_self += send_l[c.rank] * H * back.element_size()
        y = torch.zeros((T, H), dtype=torch.float32, device=back.device).index_add_(0, tok, back.float())
        return y.to(y_recv.dtype)
