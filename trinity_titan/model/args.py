"""Trinity model arguments: one dataclass for the whole family, with the HF AFMoE config mapping."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools.logging import logger

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
    context_len: int = 131072
    """The model's context length, HF `max_position_embeddings`: what an export's config.json
    says the model handles, and the longest training.seq_len the job check allows (the training
    sequences are usually shorter)."""

    # MoE
    num_experts: int = 128
    top_k: int = 8
    num_shared_experts: int = 1
    moe_hidden_dim: int = 256
    route_scale: float = 2.826
    use_grouped_mm: bool = field(default_factory=torch.cuda.is_available)
    """Routed experts through torch._grouped_mm, else a loop of per-expert matmuls (same values).
    Default per device: grouped on CUDA (one kernel for all experts; bf16 CUTLASS without a host
    sync on SM90/SM100, torch's per-group fallback elsewhere and in fp32); the loop on CPU, where
    torch's kernel runs the same per-group matmuls and the grouped path also pays for the
    padding: the loop measured 1.02-1.16x faster at the debug shapes and 1.03-1.08x at Nano's
    (docs/benchmarks.md). `[moe] use_grouped_mm` overrides it. Both run in the input dtype, or
    autocast's."""

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
        if self.use_grouped_mm and (self.dim % 8 or self.moe_hidden_dim % 8):
            problems.append(
                f"use_grouped_mm needs dim ({self.dim}) and moe_hidden_dim ({self.moe_hidden_dim})"
                " to be multiples of 8 (torch._grouped_mm wants 16-byte rows in bf16); set"
                " [moe] use_grouped_mm = false"
            )
        if problems:
            raise ConfigError("invalid Trinity model args: " + "; ".join(problems))

    # ------------------------------------------------------------------ torchtitan protocol
    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Apply the job's sequence length and the TOML overrides of the flavor defaults
        (`[model]` attention, `[moe]`, `[kernels] backend`). `[model] hf_config` replaces the
        flavor's shape with an HF config's. Checks live in training/checks.py."""
        if job_config.model.hf_config:
            for name, value in hf_shape(read_hf_config(job_config.model.hf_config)).items():
                setattr(self, name, value)
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
        experts = "torch._grouped_mm" if self.use_grouped_mm else "a per-expert loop"
        logger.info(f"Trinity routed experts: {experts}")
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
        """Build args from an HF AFMoE ``config.json`` dict (rope_theta or rope_parameters).

        Every key that changes the model is either mapped or must hold the value Trinity
        implements; anything else is refused with a ConfigError naming the key (see `hf_shape`).
        """
        args = cls(**hf_shape(config))
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
            "max_position_embeddings": self.context_len,
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


HF_REQUIRED: dict[str, Any] = {
    "model_type": "afmoe",
    "hidden_act": "silu",
    "score_func": "sigmoid",
    "route_norm": True,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_groups": 1,
    "num_limited_groups": 1,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
}
"""HF config keys that change the model, with the one value Trinity implements (absent is fine:
these are the HF defaults). The router is sigmoid scores, top-k over all experts (no expert
groups), normalised gates; SwiGLU with SiLU; RoPE without scaling; no biases, no dropout."""

HF_IGNORED = frozenset(
    {
        "architectures",
        "auto_map",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "_name_or_path",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "output_router_logits",
        "use_grouped_mm",
    }
)
"""HF config keys with no effect on the model's function: metadata, inference caching, the HF
init, token ids (they live with the tokenizer), kernel choices."""

HF_MAPPED = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_dense_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "sliding_window",
        "global_attn_every_n_layers",
        "layer_types",
        "mup_enabled",
        "max_position_embeddings",
        "num_experts",
        "num_experts_per_tok",
        "num_shared_experts",
        "moe_intermediate_size",
        "route_scale",
    }
)
"""HF config keys `hf_shape` reads into TrinityModelArgs fields."""


def hf_shape(config: dict[str, Any]) -> dict[str, Any]:
    """TrinityModelArgs fields (the model's shape) from an HF AFMoE config dict.

    Absent optional keys take transformers' AfmoeConfig defaults. A key whose value the model
    cannot honour, or a key this mapping does not know, is a ConfigError naming it: a config
    silently trained as something else is worse than one refused.
    """
    for key, want in HF_REQUIRED.items():
        have = config.get(key, want)
        if have is None and want is not None and key in ("n_group", "topk_group"):
            have = want  # None means no expert groups
        if have != want:
            raise ConfigError(
                f"HF config {key} = {have!r} is not supported: Trinity implements "
                f"{key} = {want!r} only"
            )
    unknown = sorted(set(config) - set(HF_REQUIRED) - HF_IGNORED - HF_MAPPED)
    if unknown:
        raise ConfigError(
            f"HF config keys {', '.join(unknown)} are not known to Trinity's model; remove them "
            "if they do not change the model, or use a model that implements them"
        )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        )
        if config.get(k) is None
    ]
    if missing:
        raise ConfigError(f"HF config lacks {', '.join(missing)}")
    rope = config.get("rope_parameters") or {}
    extra_rope = sorted(set(rope) - {"rope_type", "rope_theta"})
    if rope.get("rope_type", "default") != "default" or extra_rope:
        raise ConfigError(
            f"HF config rope_parameters = {rope!r} is not supported: Trinity implements plain "
            "RoPE (rope_type 'default', rope_theta) only"
        )
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    for key in ("sliding_window", "global_attn_every_n_layers", "num_dense_layers"):
        if key in config and config[key] is None:
            raise ConfigError(f"HF config {key} = None is not supported: Trinity needs a value")
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
                f"HF config layer_types must follow global_attn_every_n_layers={every} "
                f"(every {every}th layer full attention); got {layer_types}"
            )
    n_heads = config["num_attention_heads"]
    context = config.get("max_position_embeddings", 16384)
    return dict(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=n_layers,
        n_dense_layers=config.get("num_dense_layers", 1),
        ffn_hidden_dim=config["intermediate_size"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim", 128) or config["hidden_size"] // n_heads,
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        sliding_window=config.get("sliding_window", 1024),
        global_attn_every_n_layers=every,
        mup_enabled=bool(config.get("mup_enabled", False)),
        max_seq_len=context,
        context_len=context,
        num_experts=config["num_experts"],
        top_k=config["num_experts_per_tok"],
        num_shared_experts=config.get("num_shared_experts", 2),
        moe_hidden_dim=config["moe_intermediate_size"],
        route_scale=float(config.get("route_scale", 1.0)),
        init_std=None,
    )


def read_hf_config(path: str | Path, option: str = "[model] hf_config") -> dict[str, Any]:
    """The dict of an HF config.json file; a missing or malformed file names `option`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"{option} = {str(path)!r} is not a file. Fix: point it at an HF config.json "
            "(python -m trinity_titan.tools.fetch_assets puts one next to the tokenizer)."
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} = {str(path)!r} is not valid JSON: {e}") from None


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
