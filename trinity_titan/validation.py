"""Checks of a job config that fail in seconds, before any weights are built or data is read.

TorchTitan calls the TrainSpec's tokenizer builder right after setting up the process groups and
before the dataloader and the model, so that is where these run (see `build_trinity_tokenizer`).
Every error names the option to change and how.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from trinity_titan.launcher import require_trinity_trainer
from trinity_titan.model.args import TrinityModelArgs


class ConfigError(ValueError):
    """A job config that cannot run. The message names the option and the fix."""


def check_flavor(job_config: JobConfig, flavors: dict[str, TrinityModelArgs]) -> TrinityModelArgs:
    flavor = job_config.model.flavor
    if flavor not in flavors:
        raise ConfigError(
            f"[model] flavor = {flavor!r} is not a Trinity flavor. "
            f"Fix: set --model.flavor to one of {', '.join(sorted(flavors))}."
        )
    return flavors[flavor]


def _looks_local(path: str) -> bool:
    """Hub dataset names ('org/name') are not local paths; './x', '/x', '~/x' are."""
    return path.startswith(("/", "./", "../", "~")) or path.startswith(os.sep)


def check_paths(job_config: JobConfig) -> None:
    assets = job_config.model.hf_assets_path
    if not assets or not Path(assets).expanduser().is_dir():
        raise ConfigError(
            f"[model] hf_assets_path = {assets!r} is not a directory. Fix: point "
            "--model.hf_assets_path at a folder holding tokenizer.json (and config.json)."
        )
    if not any((Path(assets) / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
        raise ConfigError(
            f"[model] hf_assets_path = {assets!r} holds no tokenizer.json. Fix: download the "
            "tokenizer into it, or point --model.hf_assets_path at the folder that has it."
        )
    training = job_config.training
    if training.dataset not in DATASETS:
        raise ConfigError(
            f"[training] dataset = {training.dataset!r} is not registered. Fix: set "
            f"--training.dataset to one of {', '.join(sorted(DATASETS))}."
        )
    path = training.dataset_path
    if path and _looks_local(path) and not Path(path).expanduser().exists():
        raise ConfigError(
            f"[training] dataset_path = {path!r} does not exist. Fix: correct "
            "--training.dataset_path, or leave it empty to use the dataset's default location."
        )


def check_data_sources(job_config: JobConfig) -> None:
    """Every local `[[data.sources]]` path (file, folder or glob) must match something."""
    data = getattr(job_config, "data", None)
    for i, source in enumerate(getattr(data, "sources", None) or []):
        path = str(source.get("path", ""))
        if not path:
            raise ConfigError(
                f"[[data.sources]] entry {i} has no path. Fix: add path = a local file, folder or "
                "glob, or a hub dataset name."
            )
        if _looks_local(path) and not glob.glob(os.path.expanduser(path)):
            raise ConfigError(
                f"[[data.sources]] entry {i}: path = {path!r} matches no file. Fix: correct the "
                "path (a jsonl/parquet/arrow file, a folder of them, or a glob)."
            )


def check_vocab(
    tokenizer: BaseTokenizer, model_args: TrinityModelArgs, job_config: JobConfig
) -> None:
    """Token ids at or above the model's vocab would index past the embedding table."""
    n = tokenizer.get_vocab_size()
    if n > model_args.vocab_size:
        raise ConfigError(
            f"the tokenizer in [model] hf_assets_path = {job_config.model.hf_assets_path!r} has "
            f"{n} tokens, more than the {model_args.vocab_size} of flavor "
            f"{job_config.model.flavor!r}. Fix: use the flavor's tokenizer, or a flavor whose "
            "vocab_size covers it."
        )


def check_document_masking(
    job_config: JobConfig, model_args: TrinityModelArgs, tokenizer: BaseTokenizer
) -> None:
    """Document masks cut at the tokenizer's EOS; with SDPA they are built by Trinity's trainer
    (TorchTitan's builds masks for flex only)."""
    model = job_config.model
    attn_type = getattr(model, "attn_type", None) or model_args.attn_type
    mask_type = getattr(model, "attn_mask_type", None) or model_args.attn_mask_type
    if mask_type != "block_causal":
        return
    if getattr(tokenizer, "eos_id", None) is None:
        raise ConfigError(
            f"[model] attn_mask_type = 'block_causal' cuts documents at EOS, but the tokenizer "
            f"in hf_assets_path = {job_config.model.hf_assets_path!r} has no EOS token. Fix: use "
            "a tokenizer with an eos_token, or set --model.attn_mask_type causal."
        )
    if attn_type == "sdpa":
        require_trinity_trainer(
            "document masking with model.attn_type 'sdpa'", ", or set --model.attn_type flex"
        )
