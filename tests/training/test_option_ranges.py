"""Every numeric option is range-checked before compute, naming the option, value and range."""

from __future__ import annotations

import copy
import functools

import pytest

import trinity_titan  # noqa: F401  (registers the train spec)
from tests.fixtures import DEBUG_TOML, debug_job_config, job_config_from
from trinity_titan.job_config import ConfigError
from trinity_titan.model.flavors import trinity_flavors
from trinity_titan.training.checks import check_job
from trinity_titan.training.option_ranges import RANGES, check_model_limits, check_option_ranges

CONFIGS = sorted(DEBUG_TOML.parent.glob("trinity_*.toml"))


@pytest.fixture(scope="module")
def parsed():
    return debug_job_config()


@pytest.mark.parametrize("toml", CONFIGS, ids=lambda p: p.stem)
def test_the_shipped_configs_are_in_range(toml):
    cfg = job_config_from(toml)
    check_option_ranges(cfg)
    check_model_limits(cfg, trinity_flavors[cfg.model.flavor])


def test_every_option_in_the_table_exists():
    cfg = debug_job_config()
    for r in RANGES:
        value = cfg
        for name in r.option.split("."):
            value = getattr(value, name)  # AttributeError names a stale table entry


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("training.seq_len", "0", ">= 1"),
        ("training.local_batch_size", "0", ">= 1"),
        ("training.global_batch_size", "-2", ">= 1 (or -1)"),
        ("training.steps", "0", ">= 1"),
        ("training.max_norm", "0", "> 0"),
        ("optimizer.lr", "-0.001", ">= 0"),
        ("optimizer.beta2", "1.0", ">= 0 and < 1"),
        ("optimizer.eps", "0", "> 0"),
        ("optimizer.muon_momentum", "1.2", ">= 0 and < 1"),
        ("optimizer.ns_steps", "0", ">= 1"),
        ("lr_scheduler.warmup_steps", "-5", ">= 0"),
        ("lr_scheduler.min_lr_factor", "1.5", ">= 0 and <= 1"),
        ("lr_scheduler.decay_ratio", "2", ">= 0 and <= 1"),
        ("moe.balance_gamma", "-1e-3", ">= 0"),
        ("moe.smebu_beta", "1", ">= 0 and < 1"),
        ("moe.smebu_kappa", "0", "> 0"),
        ("moe.balance_loss_coeff", "-1", ">= 0"),
        ("loss.z_loss_coeff", "-1e-6", ">= 0"),
        ("kernels.loss_chunk_size", "0", ">= 1"),
        ("nan_guard.max_consecutive_skips", "0", ">= 1"),
        ("data.rsdb_buffer_docs", "0", ">= 1"),
        ("data.jsonl_block_bytes", "0", ">= 1"),
        ("data.table_block_rows", "0", ">= 1"),
        ("data.seed", "-1", ">= 0"),
        ("checkpoint.interval", "0", ">= 1"),
        ("checkpoint.keep_latest_k", "1", ">= 2 (or 0)"),
        ("metrics.log_freq", "0", ">= 1"),
        ("training.dataloader.num_workers", "-1", ">= 0"),
        ("run_lock.stale_after_s", "0", "> 0"),
    ],
)
def test_out_of_range_names_option_value_and_range(parsed, option, value, allowed):
    cfg = copy.deepcopy(parsed)
    *path, name = option.split(".")
    section = functools.reduce(getattr, path, cfg)
    setattr(section, name, type(getattr(section, name) or 0.0)(float(value)))
    with pytest.raises(ConfigError) as e:
        check_option_ranges(cfg)
    message = str(e.value)
    assert message.startswith(f"[{'.'.join(path)}] {name} = ")
    assert f"is out of range: it must be {allowed}. Fix: set --{option} " in message


def test_the_command_line_value_is_checked_before_compute():
    with pytest.raises(ConfigError, match=r"^\[optimizer\] lr = -0.001 is out of range"):
        check_job(debug_job_config("--optimizer.lr", "-1e-3"), 1, trinity_trainer=True, files=False)


def test_seq_len_is_bounded_by_the_flavor():
    with pytest.raises(ConfigError, match=r"seq_len = 8192 is longer than flavor 'debugmodel' "
                       r"supports: it must be <= 4096"):  # fmt: skip
        check_job(debug_job_config("--training.seq_len", "8192"), 1, trinity_trainer=True)
    large = job_config_from(
        DEBUG_TOML.parent / "trinity_large.toml", "--training.seq_len", "300000"
    )
    with pytest.raises(ConfigError, match=r"must be <= 262144"):
        check_model_limits(large, trinity_flavors["large"])


def test_newton_schulz_needs_three_coefficients():
    with pytest.raises(ConfigError, match=r"ns_coefficients = \[1.0, 2.0\] must be three"):
        check_option_ranges(debug_job_config("--optimizer.ns_coefficients", "1", "2"))
