"""Trinity attention: gated GQA with QK-norm, RoPE + sliding window on local layers, NoPE on global.

Two interchangeable kernels compute softmax(q k^T / sqrt(d) + mask) v:
- ``sdpa``: `F.scaled_dot_product_attention` with ``is_causal`` on global layers and an explicit
  boolean sliding-window mask on local ones. Runs on CPU and GPU.
- ``flex``: FlexAttention with block-sparse masks (sliding window, optional document masking),
  compiled on CUDA. Both produce the same outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import (
    BlockMask,
    and_masks,
    create_block_mask,
    flex_attention,
)
from torchtitan.models.attention import (
    FlexAttentionWrapper,
    create_attention_mask,
    get_causal_mask_mod,
    get_document_mask_mod,
    get_sliding_window_mask_mod,
)

from trinity_titan.kernels import RMSNorm
from trinity_titan.model.args import TrinityModelArgs
from trinity_titan.model.init import trunc_normal_3sigma_


class TrinityMasks(NamedTuple):
    """Masks for one batch: `local` for sliding-window layers, `global_` for causal layers.

    For SDPA a None entry means plain ``is_causal``; otherwise a bool mask (True = attend),
    [S, S], or [B, 1, S, S] with document masking. For flex both entries are BlockMasks.
    A parallelism may put its own mask description here; the model only passes it on.
    """

    local: torch.Tensor | BlockMask | None
    global_: torch.Tensor | BlockMask | None


# ---------------------------------------------------------------------------- RoPE
def precompute_rope_cache(
    head_dim: int, max_seq_len: int, theta: float, device=None
) -> torch.Tensor:
    """[max_seq_len, 2 * head_dim] fp32 table of cos | sin, half-split (NeoX) layout."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    t = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.cat((emb.cos(), emb.sin()), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, rope_cache: torch.Tensor, positions: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k ([bs, seq, heads, head_dim]) in fp32; positions is None, [seq] or [bs, seq]."""
    seqlen, head_dim = q.shape[1], q.shape[-1]
    table = rope_cache[:seqlen] if positions is None else rope_cache[positions]
    if table.ndim == 2:  # [seq, 2d] -> [1, seq, 1, 2d]
        table = table[None]
    table = table.unsqueeze(2)
    cos, sin = table[..., :head_dim], table[..., head_dim:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)

    return rotate(q), rotate(k)


# ---------------------------------------------------------------------------- masks
def sliding_window_mask(
    seqlen: int, window: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool [S, S]: query t attends to keys t-W+1 .. t."""
    i = torch.arange(seqlen, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, S] index of each token's document within its row; an EOS ends its document (the
    boundaries of TorchTitan's document mask)."""
    eos = (tokens == eos_id).int()
    return torch.cumsum(eos, dim=1) - eos


def build_sdpa_masks(
    seqlen: int, window: int, device: torch.device, documents: torch.Tensor | None = None
) -> TrinityMasks:
    """Causal and sliding-window masks; with `documents` ([B, S] ids), also within documents."""
    if documents is None:
        local = None if seqlen <= window else sliding_window_mask(seqlen, window, device)
        return TrinityMasks(local=local, global_=None)
    same_doc = (documents[:, :, None] == documents[:, None, :])[:, None]
    return TrinityMasks(
        local=same_doc & sliding_window_mask(seqlen, window, device),
        global_=same_doc & sliding_window_mask(seqlen, seqlen, device),
    )


def build_flex_masks(tokens: torch.Tensor, window: int, eos_id: int | None = None) -> TrinityMasks:
    """Block masks for the batch; with `eos_id`, tokens also stay inside their document."""
    batch, seqlen = tokens.shape
    causal = get_causal_mask_mod()
    local = get_sliding_window_mask_mod(window)
    if eos_id is not None:
        doc = get_document_mask_mod(tokens, eos_id)
        causal, local, batch_dim = and_masks(causal, doc), and_masks(local, doc), batch
    else:
        batch_dim = None
    make = create_attention_mask if tokens.is_cuda else create_block_mask
    kwargs = dict(B=batch_dim, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device=tokens.device)
    return TrinityMasks(local=make(local, **kwargs), global_=make(causal, **kwargs))


# ---------------------------------------------------------------------------- kernels
class ScaledDotProductAttention(nn.Module):
    """SDPA over [bs, heads, seq, head_dim]; a None mask means causal."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )


class FlexAttention(nn.Module):
    """FlexAttention over [bs, heads, seq, head_dim]; compiled on CUDA, eager elsewhere.

    Reuses TorchTitan's single compiled flex_attention so all layers share one compilation.
    """

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float
    ) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        if q.is_cuda:
            return FlexAttentionWrapper._compiled_flex_attn(
                q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa
            )
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)


ATTENTION_KERNELS: dict[str, type[nn.Module]] = {
    "sdpa": ScaledDotProductAttention,
    "flex": FlexAttention,
}


# ---------------------------------------------------------------------------- module
class Attention(nn.Module):
    """q, k, v and gate projections of the normed input; o = attn(q, k, v) * sigmoid(gate) -> wo."""

    def __init__(self, args: TrinityModelArgs, layer_id: int) -> None:
        super().__init__()
        self.is_local = not args.is_global_layer(layer_id)
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        inner = args.n_heads * args.head_dim
        self.wq = nn.Linear(args.dim, inner, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wg = nn.Linear(args.dim, inner, bias=False)
        self.wo = nn.Linear(inner, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.kernel_backend)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.kernel_backend)
        self.inner_attention = ATTENTION_KERNELS[args.attn_type]()

    def forward(
        self,
        x: torch.Tensor,
        rope_cache: torch.Tensor,
        masks: TrinityMasks,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.q_norm(self.wq(x).view(bs, seqlen, -1, self.head_dim))
        k = self.k_norm(self.wk(x).view(bs, seqlen, -1, self.head_dim))
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        if self.is_local:
            q, k = apply_rope(q, k, rope_cache, positions)
        out = self.inner_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            masks.local if self.is_local else masks.global_,
            self.scale,
        )
        out = out.transpose(1, 2).reshape(bs, seqlen, -1)
        return self.wo(out * torch.sigmoid(self.wg(x)))

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wg, self.wo):
            trunc_normal_3sigma_(linear.weight, init_std)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()
