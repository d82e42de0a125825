"""Bad configs fail before any compute, each with one message that names the option and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

import trinity_titan  # noqa: F401  (registers the train spec)
from tests.fixtures import DEBUG_ASSETS, debug_job_config
from trinity_titan.job_config import ConfigError
from trinity_titan.training.checks import check_job


def build(*overrides: str, trinity_trainer: bool = True):
    """The job check on the debug config; returns the tokenizer it built."""
    cfg = debug_job_config(*overrides)
    return check_job(cfg, 1, trinity_trainer=trinity_trainer).tokenizer


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


def test_sdpa_document_masking_needs_trinity_trainer():
    docs = ("--model.attn_mask_type", "block_causal")
    with pytest.raises(ConfigError, match=r"--model.attn_type flex.*trinity_titan.train"):
        build(*docs, trinity_trainer=False)  # as under -m torchtitan.train
    build(*docs, "--model.attn_type", "flex", trinity_trainer=False)
    build(*docs)


def test_a_config_without_trinity_sections_names_the_line_to_add(tmp_path):
    # TorchTitan's own JobConfig: what -m torchtitan.train parses without custom_config_module
    from torchtitan.config import ConfigManager

    toml = tmp_path / "plain.toml"
    toml.write_text('[model]\nname = "trinity"\nflavor = "debugmodel"\n')
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    with pytest.raises(ConfigError, match=r'custom_config_module = "trinity_titan.job_config"'):
        check_job(cfg, 1, trinity_trainer=False)


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


def test_an_initial_load_path_without_checkpointing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"initial_load_path = .* checkpointing is off.*"
                       r"--checkpoint.enable"):  # fmt: skip
        build("--checkpoint.initial_load_path", str(tmp_path))
    with pytest.raises(ConfigError, match=r"initial_load_path = .* is not a DCP checkpoint"):
        build("--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path))
    with pytest.raises(ConfigError, match=r"is not a directory"):
        build("--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path / "nothing"))


def test_a_source_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(ConfigError, match=r"folder .* holds no .arrow/.json/.jsonl/.parquet file"):
        build("--data.sources", "path", str(tmp_path))


FT = ("--fault_tolerance.enable", "--fault_tolerance.group_size", "2")


def _ft(*overrides: str, fault_tolerant: bool = True) -> None:
    cfg = debug_job_config(*FT, *overrides)
    check_job(cfg, 1, trinity_trainer=True, files=False, fault_tolerant=fault_tolerant)


def test_fault_tolerance_needs_the_ft_trainer_and_a_layout_it_keeps_consistent():
    _ft("--fault_tolerance.replica_id", "1")
    with pytest.raises(
        ConfigError, match=r"needs Trinity's torchft trainer.*trinity_titan.train_ft"
    ):
        _ft(fault_tolerant=False)  # -m trinity_titan.train, or TorchTitan's trainers
    with pytest.raises(ConfigError, match=r"replica_id = 2 and group_size = 2"):
        _ft("--fault_tolerance.replica_id", "2")
    with pytest.raises(ConfigError, match=r"data_parallel_replicate_degree = 2 under fault"):
        cfg = debug_job_config(*FT, "--parallelism.data_parallel_replicate_degree", "2")
        check_job(cfg, 2, trinity_trainer=True, files=False, fault_tolerant=True)
    with pytest.raises(ConfigError, match=r"semi_sync_method = 'diloco' is not supported"):
        _ft("--fault_tolerance.semi_sync_method", "diloco")
    with pytest.raises(ConfigError, match=r"enable_ft_dataloader_checkpoints = false"):
        _ft("--checkpoint.no-enable-ft-dataloader-checkpoints")


def test_the_batch_ramp_counts_every_replica_groups_ranks():
    ramp = ("--training.local_batch_size", "2", "--data.batch_ramp", "tokens", "512",
            "global_batch_size", "6")  # fmt: skip
    check_job(debug_job_config(*ramp), 1, trinity_trainer=True, files=False)  # 6 = 2 x 1 x 3
    with pytest.raises(ConfigError, match=r"global batch 6 is not a positive multiple.*2 x 2"):
        _ft(*ramp)  # two groups of one rank: 6 sequences are not a multiple of 2 x 2
