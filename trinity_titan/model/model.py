"""The Trinity decoder (HF AFMoE): interleaved local/global gated attention, sandwich norms, MoE."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.protocols.model import ModelProtocol

from trinity_titan.kernels import LossTerms, RMSNorm
from trinity_titan.model.args import TrinityModelArgs
from trinity_titan.model.attention import (
    Attention,
    TrinityMasks,
    build_flex_masks,
    build_sdpa_masks,
    document_ids,
    precompute_rope_cache,
)
from trinity_titan.model.init import trunc_normal_3sigma_
from trinity_titan.model.lm_head import FusedLoss, TrinityLMHead
from trinity_titan.model.moe import TrinityFeedForward, TrinityMoE


class TrinityBlock(nn.Module):
    """h = x + post_attn_norm(attn(attn_norm(x))); out = h + post_ffn_norm(ffn(ffn_norm(h)))."""

    def __init__(self, layer_id: int, args: TrinityModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_layers = args.n_layers
        self.moe_enabled = args.is_moe_layer(layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.kernel_backend)
        self.attention = Attention(args, layer_id)
        self.post_attention_norm = RMSNorm(args.dim, args.norm_eps, args.kernel_backend)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.kernel_backend)
        if self.moe_enabled:
            self.moe = TrinityMoE(args)
        else:
            self.feed_forward = TrinityFeedForward(
                args.dim, args.ffn_hidden_dim, backend=args.kernel_backend
            )
        self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps, args.kernel_backend)

    def forward(
        self,
        x: torch.Tensor,
        rope_cache: torch.Tensor,
        masks: TrinityMasks,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.post_attention_norm(
            self.attention(self.attention_norm(x), rope_cache, masks, positions)
        )
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return h + self.post_ffn_norm(ffn(self.ffn_norm(h)))

    def init_weights(self, init_std: float, buffer_device: torch.device | None = None) -> None:
        # Depth-scaled sandwich norm: the post-sublayer gains start at 1/sqrt(L).
        depth_gain = 1.0 / math.sqrt(self.n_layers)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.post_attention_norm.reset_parameters(depth_gain)
        self.post_ffn_norm.reset_parameters(depth_gain)
        self.attention.init_weights(init_std)
        if self.moe_enabled:
            self.moe.init_weights(init_std, buffer_device)
        else:
            self.feed_forward.init_weights(init_std)


class TrinityModel(ModelProtocol):
    """Embedding (x sqrt(d) with muP) -> blocks -> final RMSNorm -> untied LM head.

    Module names follow TorchTitan's convention (`tok_embeddings`, `layers`, `norm`, `output`) so
    its FSDP, activation checkpointing and compile helpers apply.
    """

    def __init__(self, model_args: TrinityModelArgs) -> None:
        super().__init__(model_args)
        model_args.validate()
        self.model_args = model_args
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.register_buffer("rope_cache", self._rope_cache(), persistent=False)
        self.layers = nn.ModuleDict(
            {str(i): TrinityBlock(i, model_args) for i in range(model_args.n_layers)}
        )
        self.norm = RMSNorm(model_args.dim, model_args.norm_eps, model_args.kernel_backend)
        self.output = TrinityLMHead(
            model_args.dim, model_args.vocab_size, model_args.kernel_backend
        )

    def _rope_cache(self, device: torch.device | None = None) -> torch.Tensor:
        a = self.model_args
        return precompute_rope_cache(a.head_dim, a.max_seq_len, a.rope_theta, device=device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        buffer_device = buffer_device or self.rope_cache.device
        with torch.device(buffer_device):
            self.rope_cache = self._rope_cache()
        std = self.model_args.sigma
        if self.tok_embeddings is not None:
            trunc_normal_3sigma_(self.tok_embeddings.weight, std)
        for layer in self.layers.values():
            if layer is not None:
                layer.init_weights(std, buffer_device)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            trunc_normal_3sigma_(self.output.weight, std)

    def get_attention_masks(
        self,
        input_batch: torch.Tensor,
        tokenizer: BaseTokenizer | None = None,
        extra_inputs: dict[str, torch.Tensor] | None = None,
    ) -> TrinityMasks:
        """Masks for `input_batch`; called by the trainer for flex and document masking, and by
        forward otherwise."""
        a = self.model_args
        eos_id = None
        if a.attn_mask_type == "block_causal":
            if tokenizer is None or tokenizer.eos_id is None:
                raise ValueError(
                    "document masking (attn_mask_type='block_causal') needs a tokenizer with an EOS id"
                )
            eos_id = tokenizer.eos_id
        if a.attn_type == "flex":
            return build_flex_masks(input_batch, a.sliding_window, eos_id)
        documents = None if eos_id is None else document_ids(input_batch, eos_id)
        return build_sdpa_masks(
            input_batch.shape[1], a.sliding_window, input_batch.device, documents
        )

    def forward(
        self,
        tokens: torch.Tensor,
        attention_masks: TrinityMasks | None = None,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        fused_loss: FusedLoss | None = None,
    ) -> torch.Tensor | LossTerms:
        """tokens [bs, seq] (or hidden states under pipeline stages) -> logits [bs, seq, vocab].

        With `labels` ([bs, seq]) and `fused_loss` the head returns the fused loss terms
        (`LossTerms`) instead of logits, so the [tokens, vocab] logits are never materialised.
        """
        if attention_masks is None:
            attention_masks = self.get_attention_masks(tokens)
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.model_args.mup_enabled:
                h = h * math.sqrt(self.model_args.dim)
        else:
            h = tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cache, attention_masks, positions)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is None:
            return self.output(h)
        return self.output(h, labels=labels, loss=fused_loss)
