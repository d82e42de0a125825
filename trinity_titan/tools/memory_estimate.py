"""Per-rank memory of a parallelised Trinity model: formulas used by the planner (tools/plan.py).

Parameters, gradients and optimizer state are counted from the real sharded model (its DTensor
local shards, on the meta device). Activations are an estimate from the shapes: the tensors each
layer keeps for backward, in the compute dtype, for one micro-batch of `local_batch_size`
sequences on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trinity_titan.parallel.context_parallel import query_runs, shard_positions

GiB = 1024**3


def local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon takes hidden matrices (2-D, and 3-D expert stacks); embedding, head and 1-D go to AdamW."""
    return p.ndim >= 2 and not name.startswith(("tok_embeddings", "output"))


@dataclass
class ModelStateBytes:
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    params_total: int = 0
    """Parameters of the whole model (not per rank)."""
    params_local: int = 0
    """Parameters held by this rank (elements)."""
    details: dict[str, int] = field(default_factory=dict)
    """Optimizer state by optimizer: 'muon' (momentum) and 'adamw' (two moments)."""


def model_state_bytes(
    model: nn.Module, optimizer_name: str, param_bytes: int = 4, state_bytes: int = 4
) -> ModelStateBytes:
    """Sharded parameters and gradients (fp32 masters) and optimizer state of one rank.

    AdamW keeps two fp32 buffers per parameter; Muon one momentum buffer for its matrices and
    AdamW's two for the rest. Names from `[optimizer] name`.
    """
    muon = "muon" in optimizer_name.lower()
    out = ModelStateBytes()
    for name, p in model.named_parameters():
        n = local_numel(p)
        out.params_total += p.numel()
        out.params_local += n
        out.params += n * param_bytes
        out.grads += n * param_bytes
        if muon and is_muon_param(name, p):
            key, buffers = "muon", 1
        else:
            key, buffers = "adamw", 2
        out.optimizer += n * buffers * state_bytes
        out.details[key] = out.details.get(key, 0) + n * buffers * state_bytes
    return out


def fsdp_buffer_bytes(model: nn.Module, compute_bytes: int = 2, reduce_bytes: int = 4) -> int:
    """Transient FSDP memory: the largest block unsharded twice (current + prefetched) in the
    compute dtype, plus its unsharded gradient in the reduce dtype."""
    largest = 0
    for block in model.layers.values():
        n = 0
        for p in block.parameters():
            n += p.numel() // _non_dp_shards(p)
        largest = max(largest, n)
    return largest * (2 * compute_bytes + reduce_bytes)


def _non_dp_shards(p: torch.Tensor) -> int:
    """How many ranks split a parameter outside data parallelism (TP, EP): unsharded by FSDP,
    a rank still holds only its TP/EP part."""
    if not isinstance(p, DTensor):
        return 1
    shards = 1
    for dim_name, placement in zip(p.device_mesh.mesh_dim_names or (), p.placements, strict=True):
        if placement.is_shard() and dim_name in ("tp", "ep", "etp"):
            shards *= p.device_mesh.size(p.device_mesh.mesh_dim_names.index(dim_name))
    return shards


@dataclass(frozen=True)
class ActivationShape:
    batch: int
    seq_len: int
    cp: int
    tp: int
    ep: int
    compute_bytes: int
    cp_impl: str  # [parallelism] context_parallel_impl
    attn_type: str
    documents: bool  # document masking (attn_mask_type = "block_causal")


def attention_bytes(args, s: ActivationShape, is_local: bool) -> dict[str, int]:
    """Saved-for-backward bytes of one attention op on the busiest rank, by tensor.

    q, k, v (local heads), the output and its fp32 log-sum-exp; under CP the gathered (global
    layers) or local + halo (local layers) keys/values; and the additive mask where the kernel
    takes one: SDPA's sliding-window mask without CP ([S, S]), and under CP a [L, L + W - 1]
    window mask per query chunk of length L (global layers use a lower-right causal bias, no
    mask). With document masking under SDPA (and so under CP) every mask is per sample and
    global layers need one too ([L, keys] per chunk). Attention kernels keep a boolean mask as an
    additive one in the compute dtype.
    """
    b, e = s.batch, s.compute_bytes
    q_tokens = s.seq_len // s.cp
    heads, kv_heads = args.n_heads // s.tp, args.n_kv_heads // s.tp
    hd, window = args.head_dim, args.sliding_window
    if s.cp > 1:
        worst = (0, 0)
        for rank_pos in shard_positions(s.seq_len, s.cp, True):
            runs = [
                (b_ - a, first) for a, b_, first in query_runs(rank_pos, s.seq_len // (2 * s.cp))
            ]
            if is_local and s.cp_impl == "allgather_halo":
                needed = {p for n, first in runs for p in range(max(0, first - window + 1), first)}
                k_tokens = q_tokens + len(needed - set(rank_pos.tolist()))
            else:
                k_tokens = s.seq_len
            if is_local or s.documents:
                # each chunk of n queries masks its keys: the window before it, or (document
                # masking, global layers) every earlier key; per sample with document masking
                seen = [min(window - 1, first) if is_local else first for _, first in runs]
                mask = sum(n * (n + k) for (n, _), k in zip(runs, seen, strict=True))
                mask *= b if s.documents else 1
            else:
                mask = 0
            worst = (max(worst[0], k_tokens), max(worst[1], mask))
        k_tokens, mask = worst
    else:
        k_tokens = s.seq_len
        sdpa = s.attn_type == "sdpa"
        if sdpa and s.documents:
            mask = b * q_tokens * k_tokens
        elif sdpa and is_local and s.seq_len > window:
            mask = q_tokens * k_tokens
        else:
            mask = 0
    return {
        "q": b * q_tokens * heads * hd * e,
        "kv": 2 * b * k_tokens * kv_heads * hd * e,
        "out": b * q_tokens * heads * hd * e,
        "lse": b * q_tokens * heads * 4,
        "mask": mask * e,
        # int64 key order (and rows sent to neighbours, about the halo size)
        "index": 8 * (2 * k_tokens - q_tokens if is_local else k_tokens) if s.cp > 1 else 0,
    }


def block_activation_bytes(args, s: ActivationShape, layer_id: int) -> int:
    """Tensors one block keeps for backward (no activation checkpointing)."""
    b, e = s.batch, s.compute_bytes
    t = s.seq_len // s.cp  # tokens per rank before TP
    t_sp = t // s.tp  # sequence-parallel regions
    d, hd = args.dim, args.head_dim
    heads = args.n_heads // s.tp
    fp32 = 4
    total = 4 * b * t_sp * d * fp32  # the four sandwich norms keep fp32 inputs
    total += 2 * b * t * d * e  # attention and FFN inputs (all-gathered under TP)
    total += sum(attention_bytes(args, s, not args.is_global_layer(layer_id)).values())
    total += 2 * b * t * heads * hd * e  # gate projection and gated output
    if args.is_moe_layer(layer_id):
        routed = b * t * args.top_k // s.tp  # token copies per rank after dispatch (balanced)
        total += b * t * args.num_experts * fp32  # router scores
        total += routed * (2 * d + 3 * args.moe_hidden_dim) * e
        total += b * t * 3 * args.moe_hidden_dim * args.num_shared_experts // s.tp * e
    else:
        total += b * t * 3 * args.ffn_hidden_dim // s.tp * e
    return total


def activation_bytes(
    args,
    s: ActivationShape,
    checkpointed: set[int],
    fused_loss_chunk: int | None = None,
) -> dict[str, int]:
    """Activation estimate for one micro-batch: blocks, plus the loss's fp32 logits and gradient.

    `checkpointed`: the layers whose whole block is recomputed in backward (activation
    checkpointing 'full', or 'selective' every n-th layer). Such a block keeps only its input,
    and backward rebuilds one of them at a time; every other block keeps all its tensors.
    The materialised loss holds [tokens, vocab] fp32 logits and their gradient (replicated over
    TP: no loss parallelism). The fused loss holds one chunk of them plus an fp32 accumulator for
    the head's weight gradient.
    """
    blocks = [block_activation_bytes(args, s, i) for i in range(args.n_layers)]
    tokens = s.batch * s.seq_len // s.cp
    if fused_loss_chunk:
        logits = 2 * min(tokens, fused_loss_chunk) * args.vocab_size * 4
        logits += args.vocab_size * args.dim * 4
    else:
        logits = 2 * tokens * args.vocab_size * 4
    block_input = tokens // s.tp * args.dim * s.compute_bytes
    kept = sum(block_input if i in checkpointed else b for i, b in enumerate(blocks))
    kept += max((blocks[i] for i in checkpointed), default=0)  # one block rebuilt in backward
    return {"blocks": kept, "logits": logits}
