"""Bad configs fail before any compute, each with one message that names the option and the fix."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from torchrun_utils import DEBUG_TOML, REPO, run_train
from torchtitan.config import ConfigManager

import trinity_titan  # noqa: F401  (registers the train spec)
from trinity_titan import launcher
from trinity_titan.tokenizer import build_trinity_tokenizer
from trinity_titan.validation import ConfigError

DEBUG_ASSETS = REPO / "trinity_titan" / "assets" / "debug"


def build(*overrides: str):
    cfg = ConfigManager().parse_args(["--job.config_file", str(DEBUG_TOML), *overrides])
    return build_trinity_tokenizer(cfg)


def test_the_debug_config_is_valid():
    assert build().get_vocab_size() <= 2048


def test_unknown_flavor():
    with pytest.raises(ConfigError, match=r"flavor = 'tiny'.*--model.flavor to one of"):
        build("--model.flavor", "tiny")


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"hf_assets_path = .* is not a directory"):
        build("--model.hf_assets_path", str(tmp_path / "nowhere"))


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no tokenizer.json"):
        build("--model.hf_assets_path", str(tmp_path))


def test_missing_dataset_path(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset_path = .* does not exist"):
        build("--training.dataset_path", str(tmp_path / "corpus.jsonl"))


def test_unregistered_dataset():
    with pytest.raises(ConfigError, match=r"dataset = 'c5' is not registered"):
        build("--training.dataset", "c5")


def test_missing_data_source(tmp_path):
    with pytest.raises(ConfigError, match=r"entry 0: path = .* matches no file"):
        build("--data.sources", "path", str(tmp_path / "web" / "*.parquet"))


def test_tokenizer_vocab_larger_than_the_model(tmp_path):
    big = tmp_path / "tokenizer"
    shutil.copytree(DEBUG_ASSETS, big, ignore=shutil.ignore_patterns("*.jsonl"))
    tok = json.loads((big / "tokenizer.json").read_text())
    n = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    for i in range(2048 - n + 10):  # push the vocab past the debug model's 2048
        tok["model"]["vocab"][f"<extra_{i}>"] = n + i
    (big / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"more than the 2048 of flavor 'debugmodel'"):
        build("--model.hf_assets_path", str(big))


def test_sdpa_document_masking_needs_trinity_trainer(monkeypatch):
    monkeypatch.setattr(launcher, "_TRINITY_TRAINER", False)  # as under -m torchtitan.train
    with pytest.raises(RuntimeError, match=r"trinity_titan.train.*--model.attn_type flex"):
        build("--model.attn_mask_type", "block_causal")
    build("--model.attn_mask_type", "block_causal", "--model.attn_type", "flex")
    monkeypatch.setattr(launcher, "_TRINITY_TRAINER", True)
    build("--model.attn_mask_type", "block_causal")


def test_document_masking_needs_an_eos_token(tmp_path):
    no_eos = tmp_path / "tokenizer"
    shutil.copytree(DEBUG_ASSETS, no_eos, ignore=shutil.ignore_patterns("*.jsonl"))
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    args = ("--model.hf_assets_path", str(no_eos), "--model.attn_type", "flex")
    assert build(*args).eos_id is None
    with pytest.raises(ConfigError, match=r"has no EOS token.*--model.attn_mask_type causal"):
        build(*args, "--model.attn_mask_type", "block_causal")


@pytest.mark.slow
def test_torchrun_fails_in_seconds_with_the_message(tmp_path: Path):
    start = time.monotonic()
    _, log = run_train(tmp_path, 1, "--model.flavor", "tiny", check=False, timeout=120)
    assert "ConfigError: [model] flavor = 'tiny' is not a Trinity flavor" in log
    assert "Building trinity" not in log  # failed before the model was built
    assert time.monotonic() - start < 60
