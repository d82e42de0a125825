"""The Trinity family. nano/mini/large carry the published shapes (HF configs, technical report)."""

from trinity_titan.model.args import TrinityModelArgs

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
        max_context_len=4096,  # a CPU model: longer sequences only cost memory
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
        max_context_len=524288,
        num_experts=256,
        top_k=4,
        moe_hidden_dim=3072,
        route_scale=2.448,
        balance_method="smebu",
        balance_loss_coeff=1e-4,
    ),
}
