"""Shared test helpers: repository paths, the debug config and tokenizer, small corpora."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager, JobConfig

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = REPO / "train_configs" / "trinity_debug.toml"
DEBUG_ASSETS = REPO / "trinity_titan" / "assets" / "debug"

# Trinity-Nano-Preview's config.json as published (transformers 4.57 layout, remote-code keys).
NANO_HF_CONFIG = {
    "architectures": ["AfmoeForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_afmoe.AfmoeConfig",
        "AutoModel": "modeling_afmoe.AfmoeModel",
        "AutoModelForCausalLM": "modeling_afmoe.AfmoeForCausalLM",
    },
    "dtype": "bfloat16",
    "global_attn_every_n_layers": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 131072,
    "model_type": "afmoe",
    "moe_intermediate_size": 256,
    "mup_enabled": True,
    "n_group": 1,
    "num_attention_heads": 8,
    "num_dense_layers": 2,
    "num_expert_groups": 1,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 56,
    "num_key_value_heads": 2,
    "num_limited_groups": 1,
    "num_shared_experts": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000,
    "route_norm": True,
    "route_scale": 2.826,
    "score_func": "sigmoid",
    "sliding_window": 2048,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "transformers_version": "4.57.3",
    "use_cache": True,
    "use_grouped_mm": True,
    "vocab_size": 200192,
}


def job_config_from(path: Path, *overrides: str) -> JobConfig:
    """A JobConfig parsed the way TorchTitan parses a launch: the TOML, then CLI overrides."""
    return ConfigManager().parse_args(["--job.config_file", str(path), *overrides])


def debug_job_config(*overrides: str) -> JobConfig:
    return job_config_from(DEBUG_TOML, *overrides)


def debug_tokenizer() -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(str(DEBUG_ASSETS))


def write_corpora(folder: Path) -> tuple[str, str, str]:
    """The same kind of text as jsonl, parquet (other text field) and an arrow directory."""
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    texts = [" ".join(words[(i + j) % 8] for j in range(3 + i % 11)) + f" {i}" for i in range(90)]
    jsonl = folder / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:50]))
    parquet = folder / "b.parquet"
    Dataset.from_dict({"content": texts[50:80]}).to_parquet(str(parquet))
    arrow = folder / "c_arrow"
    Dataset.from_dict({"text": texts[80:]}).save_to_disk(str(arrow))
    return str(jsonl), str(parquet), str(arrow)


def save_dcp_checkpoint(
    step_dir: Path,
    *,
    full: bool = True,
    dp_degree: int = 1,
    num_workers: int = 0,
    steps_since_snapshot: int = 0,
) -> Path:
    """A one-process DCP checkpoint laid out like TorchTitan's: the model keys at the top, and
    (full) optimizer, lr_scheduler, dataloader (torchdata state, pickled per dp rank) and
    train_state. Returns `step_dir`."""
    import pickle
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    loader = (
        {
            "_snapshot": {"_main_snapshot": {"_num_workers": num_workers}},
            "_steps_since_snapshot": steps_since_snapshot,
        }  # fmt: skip
        if num_workers
        else {"_num_yielded": 3}
    )
    state: dict = {"tok_embeddings.weight": torch.randn(64, 16), "norm.weight": torch.ones(16)}
    if full:
        state |= {
            "optimizer": {"state": {"norm.weight": {"exp_avg": torch.zeros(16)}}},
            "lr_scheduler": {"last_epoch": 3},
            "dataloader": {
                **{f"dp_rank_{r}": pickle.dumps(loader) for r in range(dp_degree)},
                "world_size": dp_degree,
                "local_batch_size": 8,  # the debug config's
                "global_batch_size": 8 * dp_degree,
            },
            "train_state": {"step": 3, "ntokens_seen": 384, "global_tokens_seen": 384 * dp_degree},
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(step_dir)), no_dist=True)
    return step_dir
