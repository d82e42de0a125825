"""Context parallelism for Trinity's two attention kinds, from plain collectives (gloo and NCCL).

The sequence is split into 2C chunks and CP rank r holds chunks r and 2C-1-r (the "head-tail"
layout TorchTitan's trainer shards inputs, labels and positions with), so causal work is balanced.

- Global layers (causal, NoPE): keys/values are all-gathered over the CP group. With GQA they are
  n_kv_heads / n_heads of the queries' size, as in Llama 3's long-context CP.
- Local layers (sliding window W): a query at t sees t-W+1 .. t, so a rank only needs the W-1
  keys/values before each of its chunks. They come from the ranks that own them through one
  all-to-all (a neighbour exchange); nothing else moves.

Each query chunk then runs its own attention call over the contiguous range of keys it may see,
with masks from the true token positions, so the result equals single-rank attention: global
layers use a lower-right causal bias (no mask tensor in CUDA flash kernels), local layers a small
[L, L + W - 1] window mask per chunk of L queries. With document masking the trainer hands every
rank the document ids of the whole sequence (`SequenceDocuments`, computed before the batch is
sharded), and each chunk's mask also keeps queries and keys within a document: no extra
communication, but global layers then need an explicit [B, 1, L, keys] mask.
`parallelize_trinity` swaps each block's `attention.inner_attention` for
`ContextParallelAttention`; the model code is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.nn.attention.bias import causal_lower_right

from trinity_titan.compat.collectives import all_gather_single, reduce_scatter_single


@dataclass(frozen=True)
class SequenceDocuments:
    """Document ids [B, S] of the whole (unsharded) sequence, the CP op's document mask."""

    ids: torch.Tensor


# ---------------------------------------------------------------------------- layout
@lru_cache(maxsize=64)
def shard_positions(seq_len: int, cp: int, load_balance: bool) -> torch.Tensor:
    """[cp, seq_len // cp] global token indices held by each CP rank."""
    if not load_balance:
        return torch.arange(seq_len).view(cp, -1)
    chunk = seq_len // (2 * cp)
    chunks = torch.arange(seq_len).view(2 * cp, chunk)
    return torch.stack([torch.cat((chunks[r], chunks[2 * cp - 1 - r])) for r in range(cp)])


@lru_cache(maxsize=64)
def halo_plan(
    seq_len: int, cp: int, load_balance: bool, window: int
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Which keys each rank sends to each other rank for a sliding window of `window` keys.

    Returns (send, halo_positions): send[s][r] are the local indices on rank s of the tokens
    rank r needs (sorted by position); halo_positions[r] are their global positions in the
    order rank r receives them (by source rank).
    """
    pos = shard_positions(seq_len, cp, load_balance)
    owner = torch.empty(seq_len, dtype=torch.long)
    local_index = torch.empty(seq_len, dtype=torch.long)
    for r in range(cp):
        owner[pos[r]] = r
        local_index[pos[r]] = torch.arange(pos.shape[1])
    send = [[torch.empty(0, dtype=torch.long) for _ in range(cp)] for _ in range(cp)]
    halo = []
    for r in range(cp):
        own = torch.zeros(seq_len, dtype=torch.long)
        own[pos[r]] = 1
        # key j is needed iff an own query lies in [j, j + window - 1]
        csum = torch.cat((torch.zeros(1, dtype=torch.long), own.cumsum(0)))
        j = torch.arange(seq_len)
        hi = torch.clamp(j + window, max=seq_len)
        needed = ((csum[hi] - csum[j]) > 0) & (own == 0)
        positions = needed.nonzero().flatten()
        received = []
        for s in range(cp):
            from_s = positions[owner[positions] == s]
            send[s][r] = local_index[from_s]
            received.append(from_s)
        halo.append(torch.cat(received))
    return send, halo


# ---------------------------------------------------------------------------- collectives
def _is_nccl(group: dist.ProcessGroup) -> bool:
    return dist.get_backend(group) == "nccl"


class _AllGatherSeq(torch.autograd.Function):
    """Concatenate every rank's [seq, ...] tensor along dim 0; backward sums and keeps our part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if _is_nccl(group):
            out = grad.new_empty((n, *grad.shape[1:]))
            reduce_scatter_single(out, grad, group=group)
            return out, None
        # gloo has no reduce-scatter: all-reduce, then keep this rank's slice
        dist.all_reduce(grad, group=group)
        return grad[rank * n : (rank + 1) * n].clone(), None


class _ExchangeRows(torch.autograd.Function):
    """All-to-all of chosen rows of a [seq, ...] tensor: rank s sends rows send[s][r] to r."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        group: dist.ProcessGroup,
        send_index: torch.Tensor,
        send_counts: list[int],
        recv_counts: list[int],
    ) -> torch.Tensor:
        ctx.group, ctx.send_counts, ctx.recv_counts = group, send_counts, recv_counts
        ctx.save_for_backward(send_index)
        ctx.rows = x.shape[0]
        buf = x.index_select(0, send_index).contiguous()
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, buf, recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (send_index,) = ctx.saved_tensors
        grad = grad.contiguous()
        back = grad.new_empty((sum(ctx.send_counts), *grad.shape[1:]))
        dist.all_to_all_single(back, grad, ctx.send_counts, ctx.recv_counts, group=ctx.group)
        dx = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        dx.index_add_(0, send_index, back)
        return dx, None, None, None, None


# ---------------------------------------------------------------------------- attention op
class ContextParallelAttention(nn.Module):
    """Drop-in for the model's inner attention, over [bs, heads, seq_local, head_dim] tensors.

    `window` None means a global (causal) layer. `halo` False all-gathers keys/values on local
    layers too (the 'allgather' implementation).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        window: int | None,
        load_balance: bool = True,
        halo: bool = True,
    ) -> None:
        super().__init__()
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.window = window
        self.load_balance = load_balance
        self.halo = halo

    def extra_repr(self) -> str:
        kind = "global" if self.window is None else f"local(window={self.window})"
        comm = "halo" if self.window is not None and self.halo else "all-gather"
        return f"cp={self.cp}, {kind}, {comm}"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: object,
        scale: float,
    ) -> torch.Tensor:
        # CP masks come from true positions; a model-built mask would be for the local shard
        docs = mask.ids if isinstance(mask, SequenceDocuments) else None
        seq_local = q.shape[2]
        seq_len = seq_local * self.cp
        positions = shard_positions(seq_len, self.cp, self.load_balance)
        q_pos = positions[self.rank]
        # collectives work on dim 0: [seq, 2 (k|v), bs, kv_heads, head_dim]
        kv = torch.stack((k, v)).permute(3, 0, 1, 2, 4)
        if self.window is not None and self.halo:
            send, halo = halo_plan(seq_len, self.cp, self.load_balance, self.window)
            send_index = torch.cat(send[self.rank]).to(q.device)
            send_counts = [len(send[self.rank][r]) for r in range(self.cp)]
            recv_counts = [len(send[s][self.rank]) for s in range(self.cp)]
            received = _ExchangeRows.apply(kv, self.group, send_index, send_counts, recv_counts)
            kv = torch.cat((kv, received))
            k_pos = torch.cat((q_pos, halo[self.rank]))
        else:
            kv = _AllGatherSeq.apply(kv, self.group)
            k_pos = positions.flatten()
        # keys in position order: each query chunk then needs one contiguous range of them
        k_pos, order = torch.sort(k_pos)
        kv = kv.index_select(0, order.to(q.device)).permute(1, 2, 3, 0, 4)
        outs = []
        for start, end, first in query_runs(q_pos, max(1, seq_len // (2 * self.cp))):
            lo = 0 if self.window is None else max(0, first - self.window + 1)
            k_lo = int(torch.searchsorted(k_pos, lo))
            k_hi = int(torch.searchsorted(k_pos, first + (end - start)))
            q_run = q[:, :, start:end]
            k_run, v_run = kv[0, :, :, k_lo:k_hi], kv[1, :, :, k_lo:k_hi]
            if self.window is None and docs is None:
                # the chunk sees every earlier key and itself causally: a lower-right causal mask
                bias = causal_lower_right(end - start, k_hi - k_lo)
            else:
                rel = torch.arange(end - start)[:, None] + (first - lo) - torch.arange(k_hi - k_lo)
                bias = (rel >= 0) if self.window is None else (rel >= 0) & (rel < self.window)
                bias = bias.to(q.device)
                if docs is not None:
                    # keys k_lo:k_hi are the positions lo .. lo + (k_hi - k_lo) - 1
                    q_docs = docs[:, first : first + end - start]
                    k_docs = docs[:, lo : lo + k_hi - k_lo]
                    bias = bias & (q_docs[:, :, None] == k_docs[:, None, :])[:, None]
            outs.append(
                F.scaled_dot_product_attention(
                    q_run,
                    k_run,
                    v_run,
                    attn_mask=bias,
                    scale=scale,
                    enable_gqa=k_run.shape[1] != q.shape[1],
                )
            )
        return torch.cat(outs, dim=2)


def query_runs(q_pos: torch.Tensor, max_len: int) -> list[tuple[int, int, int]]:
    """(start, end, first position) of runs of consecutive positions, at most `max_len` long."""
    breaks = {0, len(q_pos), *range(max_len, len(q_pos), max_len)}
    breaks.update(((q_pos[1:] - q_pos[:-1]) != 1).nonzero().flatten().add(1).tolist())
    edges = sorted(breaks)
    return [(a, b, int(q_pos[a])) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def apply_context_parallel(
    model: nn.Module, group: dist.ProcessGroup, load_balance: bool, impl: str
) -> None:
    """Swap every block's inner attention for `ContextParallelAttention`."""
    window = model.model_args.sliding_window
    for block in model.layers.values():
        attention = block.attention
        attention.inner_attention = ContextParallelAttention(
            group,
            window=window if attention.is_local else None,
            load_balance=load_balance,
            halo=impl == "allgather_halo",
        )


def apply_compile_around_cp(model: nn.Module, backend: str) -> None:
    """torch.compile every module of each block except the CP attention op itself.

    The op's plan (Python-side positions, variable chunk loop, process-group collectives) is
    not fullgraph-traceable, so it stays eager; its neighbours (projections, norms, QK-norm,
    FFN, router, shared experts) are compiled with fullgraph=True. Routed experts stay eager as
    in TorchTitan (their FSDP hooks).
    """
    for block in model.layers.values():
        inner = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
        for name, child in list(inner.named_children()):
            if name == "attention":
                for sub_name, sub in list(child.named_children()):
                    if sub_name != "inner_attention":
                        setattr(
                            child, sub_name, torch.compile(sub, backend=backend, fullgraph=True)
                        )
            elif name == "moe":
                for sub_name, sub in list(child.named_children()):
                    if sub_name != "experts":
                        setattr(
                            child, sub_name, torch.compile(sub, backend=backend, fullgraph=True)
                        )
            else:
                setattr(inner, name, torch.compile(child, backend=backend, fullgraph=True))
