"""Datasets registered into TorchTitan's text-dataset registry."""

from __future__ import annotations

from pathlib import Path

from datasets import load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

DEBUG_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "debug"
TRINITY_DATASETS = {"trinity_debug": "corpus.jsonl", "trinity_debug_validation": "validation.jsonl"}
"""Trinity's registered datasets and their files in the debug assets (JSON lines, field "text")."""


def _load_jsonl(path: str):
    return load_dataset("json", data_files=path, split="train")


def _text(sample: dict) -> str:
    return sample["text"]


def register_datasets() -> None:
    """`trinity_debug` / `trinity_debug_validation`: the offline corpus shipped with the package."""
    for name, file in TRINITY_DATASETS.items():
        DATASETS.setdefault(
            name,
            DatasetConfig(
                path=str(DEBUG_ASSETS / file), loader=_load_jsonl, sample_processor=_text
            ),
        )
