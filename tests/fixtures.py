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
