"""The Trinity family. nano/mini/large carry the published shapes (HF configs, technical report).

context_len is the model's context (HF max_position_embeddings): 131072 in the published Nano and
Mini configs; 262144 for Large, the report's context extension (CP 4 to 256K). Training sequences
(training.seq_len) are shorter.
"""

from dataclasses import dataclass

from trinity_titan.model.args import TrinityModelArgs


@dataclass(frozen=True)
class FlavorAssets:
    """Where a flavor's tokenizer and config.json come from, and where its TOML looks for them."""

    repo: str
    """Arcee's Hugging Face repo of the flavor (`python -m trinity_titan.tools.fetch_assets`)."""
    folder: str
    """`[model] hf_assets_path` of train_configs/trinity_<flavor>.toml."""


FLAVOR_ASSETS: dict[str, FlavorAssets] = {
    "nano": FlavorAssets("arcee-ai/Trinity-Nano-Preview", "./assets/trinity_nano"),
    "mini": FlavorAssets("arcee-ai/Trinity-Mini", "./assets/trinity_mini"),
    "large": FlavorAssets("arcee-ai/Trinity-Large-Preview", "./assets/trinity_large"),
}
"""The published repos (all three share one 200192-token tokenizer)."""

trinity_flavors: dict[str, TrinityModelArgs] = {
    # Tiny, trains in seconds on a CPU: 2 dense + 2 MoE layers (layer 3 global), GQA, window < seq_len.
    "debugmodel": TrinityModelArgs(
        vocab_size=2048,
        dim=128,
        n_layers=4,
        n_dense_layers=2,
        ffn_hidden_dim=256,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        sliding_window=32,
        max_seq_len=128,
        context_len=4096,  # a CPU model: longer sequences only cost memory
        num_experts=8,
        top_k=2,
        num_shared_experts=1,
        moe_hidden_dim=64,
        route_scale=2.826,
        init_std=0.5 / 128**0.5,
    ),
    # ~6B total / ~1B active.
    "nano": TrinityModelArgs(
        dim=1024,
        n_layers=56,
        n_dense_layers=2,
        ffn_hidden_dim=3072,
        n_heads=8,
        n_kv_heads=2,
        head_dim=128,
        sliding_window=2048,
        max_seq_len=4096,
        context_len=131072,
        num_experts=128,
        top_k=8,
        moe_hidden_dim=256,
        route_scale=2.826,
    ),
    # ~26B total / ~3B active.
    "mini": TrinityModelArgs(
        dim=2048,
        n_layers=32,
        n_dense_layers=2,
        ffn_hidden_dim=6144,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        sliding_window=2048,
        max_seq_len=4096,
        context_len=131072,
        num_experts=128,
        top_k=8,
        moe_hidden_dim=1024,
        route_scale=2.826,
    ),
    # ~400B total / ~13B active; SMEBU balancing and the sequence-wise balance loss.
    "large": TrinityModelArgs(
        dim=3072,
        n_layers=60,
        n_dense_layers=6,
        ffn_hidden_dim=12288,
        n_heads=48,
        n_kv_heads=8,
        head_dim=128,
        sliding_window=4096,
        max_seq_len=8192,
        context_len=262144,  # 256K after context extension (the report)
        num_experts=256,
        top_k=4,
        moe_hidden_dim=3072,
        route_scale=2.448,
        balance_method="smebu",
        balance_loss_coeff=1e-4,
    ),
}
