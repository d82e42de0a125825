"""Trinity model arguments: one dataclass for the whole family, with the HF AFMoE config mapping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import has_cuda_capability

from trinity_titan.job_config import ConfigError
from trinity_titan.kernels.backend import resolve_backend

AttnBackend = Literal["sdpa", "flex"]
AttnMaskType = Literal["causal", "block_causal"]
BalanceMethod = Literal["none", "aux_free", "smebu"]


@dataclass
class TrinityModelArgs(BaseModelArgs):
    """Shapes and numerics of a Trinity (AFMoE) model.

    Field names follow TorchTitan (dim, n_layers, ...); `from_hf_config` / `to_hf_config`
    translate to and from the names of an HF ``config.json`` with ``model_type = "afmoe"``.
    """

    vocab_size: int = 200192
    dim: int = 1024
    n_layers: int = 56
    n_dense_layers: int = 2
    ffn_hidden_dim: int = 3072
    """Intermediate size of the dense SwiGLU in the first `n_dense_layers` layers."""
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 128
    """Attention width is n_heads * head_dim, which need not equal dim (mini, large)."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int = 2048
    """Local layers let query t see keys t-W+1 .. t (W keys including itself)."""
    global_attn_every_n_layers: int = 4
    """Layer i is global (causal, no positional encoding) iff (i + 1) % n == 0."""
    mup_enabled: bool = True
    """Scale the token embeddings by sqrt(dim) (muP input scale); the LM head is not scaled."""
    max_seq_len: int = 4096
    """Length of the RoPE cache; set from training.seq_len."""
    max_context_len: int = 131072
    """The longest training.seq_len the flavor supports: its published context length (HF
    model cards: 128K for Trinity Mini, 512K for Large after context extension); the job check
    refuses a longer seq_len."""

    # MoE
    num_experts: int = 128
    top_k: int = 8
    num_shared_experts: int = 1
    moe_hidden_dim: int = 256
    route_scale: float = 2.826
    use_grouped_mm: bool = field(default_factory=lambda: has_cuda_capability(9, 0))
    """torch._grouped_mm (bf16) for routed experts; needs SM90+. Elsewhere an exact per-expert loop."""

    # Expert-bias balancing defaults of the flavor (the [moe] TOML section overrides them).
    balance_method: BalanceMethod = "aux_free"
    balance_gamma: float = 1e-3
    smebu_lambda: float = 5e-4
    smebu_beta: float = 0.5
    smebu_kappa: float = 2.0
    balance_loss_coeff: float = 0.0
    """Coefficient alpha of the sequence-wise balance loss (0 disables it)."""

    # Attention kernels
    attn_type: AttnBackend = "sdpa"
    attn_mask_type: AttnMaskType = "causal"
    """`block_causal` adds document masking: tokens do not attend across EOS (flex: block-sparse;
    sdpa: an explicit per-batch mask)."""

    init_std: float | None = None
    """Std of every weight's truncated normal (cut at +-3 std); None means 0.5 / sqrt(dim)."""

    # Fused kernels (resolved from the [kernels] TOML section)
    kernel_backend: Literal["torch", "liger"] = "torch"
    """RMSNorm, SwiGLU and fused-loss implementation, resolved from `[kernels] backend`."""

    # ------------------------------------------------------------------ derived shapes
    @property
    def sigma(self) -> float:
        return self.init_std if self.init_std is not None else 0.5 / math.sqrt(self.dim)

    def is_global_layer(self, layer_id: int) -> bool:
        return (layer_id + 1) % self.global_attn_every_n_layers == 0

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def validate(self) -> None:
        """Fail early, with the field to fix, on shapes the model cannot be built with."""
        problems = []
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            problems.append(
                f"n_dense_layers ({self.n_dense_layers}) must be in [0, n_layers={self.n_layers}]"
            )
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}]")
        if self.sliding_window < 1:
            problems.append(f"sliding_window ({self.sliding_window}) must be >= 1")
        if problems:
            raise ConfigError("invalid Trinity model args: " + "; ".join(problems))

    # ------------------------------------------------------------------ torchtitan protocol
    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Apply the job's sequence length and the TOML overrides of the flavor defaults
        (`[model]` attention, `[moe]`, `[kernels] backend`). Checks live in training/checks.py."""
        self.max_seq_len = job_config.training.seq_len
        for name in ("attn_type", "attn_mask_type"):
            value = getattr(job_config.model, name)
            if value:
                setattr(self, name, value)
        for f in fields(job_config.moe):  # [moe] fields are named like these args
            value = getattr(job_config.moe, f.name)
            if value is not None:
                setattr(self, f.name, value)
        self.kernel_backend = resolve_backend(job_config.kernels.backend)
        if self.use_grouped_mm and not has_cuda_capability(9, 0):
            logger.info("torch._grouped_mm needs SM90+; routed experts use a per-expert loop")
            self.use_grouped_mm = False
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Total parameters and training FLOPs per token (6 x active non-embedding params + attention).

        Attention FLOPs follow TorchTitan's convention (12 * heads * head_dim * context per layer,
        causal sparsity ignored), with the context of a local layer capped at the window.
        """
        counts = count_params(self, model)
        logger.info(
            f"Trinity parameters: total {counts['total']:,}, active {counts['active']:,}, "
            f"input embedding {counts['embedding']:,}"
        )
        attn = sum(
            12
            * self.n_heads
            * self.head_dim
            * (seq_len if self.is_global_layer(i) else min(seq_len, self.sliding_window))
            for i in range(self.n_layers)
        )
        flops = 6 * (counts["active"] - counts["embedding"]) + attn
        return counts["total"], flops

    # ------------------------------------------------------------------ HF config mapping
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], **overrides: Any) -> TrinityModelArgs:
        """Build args from an HF AFMoE ``config.json`` dict (rope_theta or rope_parameters)."""
        if config.get("model_type", "afmoe") != "afmoe":
            raise ConfigError(
                f"expected an HF config with model_type 'afmoe', got {config.get('model_type')!r}"
            )
        rope = config.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default')")
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if config.get("tie_word_embeddings", False):
            raise ConfigError(
                "Trinity has an untied LM head; tie_word_embeddings=True is not supported"
            )
        if config.get("attention_bias", False):
            raise ConfigError(
                "Trinity has no attention biases; attention_bias=True is not supported"
            )
        n_layers = config["num_hidden_layers"]
        every = config.get("global_attn_every_n_layers", 4)
        layer_types = config.get("layer_types")
        if layer_types is not None:
            expected = [
                "full_attention" if (i + 1) % every == 0 else "sliding_attention"
                for i in range(n_layers)
            ]
            if list(layer_types) != expected:
                raise ConfigError(
                    f"layer_types must follow global_attn_every_n_layers={every}; got {layer_types}"
                )
        n_heads = config["num_attention_heads"]
        args = cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=n_layers,
            n_dense_layers=config.get("num_dense_layers", 1),
            ffn_hidden_dim=config["intermediate_size"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            sliding_window=config["sliding_window"],
            global_attn_every_n_layers=every,
            mup_enabled=bool(config.get("mup_enabled", False)),
            max_seq_len=config.get("max_position_embeddings", 4096),
            max_context_len=config.get("max_position_embeddings", 131072),
            num_experts=config["num_experts"],
            top_k=config["num_experts_per_tok"],
            num_shared_experts=config.get("num_shared_experts", 1),
            moe_hidden_dim=config["moe_intermediate_size"],
            route_scale=float(config.get("route_scale", 1.0)),
        )
        for key, value in overrides.items():
            setattr(args, key, value)
        args.validate()
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """An HF AFMoE ``config.json`` dict (transformers >= 5 layout, rope_parameters)."""
        return {
            "architectures": ["AfmoeForCausalLM"],
            "model_type": "afmoe",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "moe_intermediate_size": self.moe_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_dense_layers": self.n_dense_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "num_shared_experts": self.num_shared_experts,
            "route_scale": self.route_scale,
            "global_attn_every_n_layers": self.global_attn_every_n_layers,
            "sliding_window": self.sliding_window,
            "layer_types": [
                "full_attention" if self.is_global_layer(i) else "sliding_attention"
                for i in range(self.n_layers)
            ],
            "mup_enabled": self.mup_enabled,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": self.sigma,
        }


def count_params(args: TrinityModelArgs, model: nn.Module) -> dict[str, int]:
    """Total, active (per token) and input-embedding parameter counts; works on the meta device.

    Active counts every non-routed parameter plus top_k / num_experts of the routed experts.
    """
    total = active = embedding = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if ".moe.experts." in f".{name}":
            active += n * args.top_k // args.num_experts
        else:
            active += n
        if name.startswith("tok_embeddings"):
            embedding += n
    return {"total": total, "active": active, "embedding": embedding}
