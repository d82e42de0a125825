"""The shipped TOMLs parse with TorchTitan's ConfigManager and the Trinity config extension."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from torchtitan.config import ConfigManager

import trinity_titan  # noqa: F401  (registers the train spec)
from trinity_titan.model import trinity_flavors
from trinity_titan.tools import plan

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "train_configs").glob("*.toml"))


def parse(path: Path, *overrides: str):
    return ConfigManager().parse_args(["--job.config_file", str(path), *overrides])


def test_configs_exist():
    assert {p.stem for p in CONFIGS} >= {
        "trinity_debug",
        "trinity_nano",
        "trinity_mini",
        "trinity_large",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path):
    cfg = parse(path)
    assert cfg.model.name == "trinity"
    assert cfg.model.flavor in trinity_flavors
    assert cfg.experimental.custom_import == "trinity_titan"
    assert cfg.job.custom_config_module == "trinity_titan.job_config"


def test_command_line_overrides_toml():
    large = next(p for p in CONFIGS if p.stem == "trinity_large")
    cfg = parse(
        large, "--parallelism.expert_parallel_degree", "4", "--moe.balance_method", "aux_free"
    )
    assert cfg.parallelism.expert_parallel_degree == 4
    assert cfg.moe.balance_method == "aux_free"


def test_large_layout_is_the_reports():
    cfg = parse(next(p for p in CONFIGS if p.stem == "trinity_large"))
    p = cfg.parallelism
    assert p.data_parallel_shard_degree == 128 and p.expert_parallel_degree == 8
    assert p.data_parallel_replicate_degree * p.data_parallel_shard_degree == 2048
    assert cfg.training.seq_len == 8192 and cfg.lr_scheduler.warmup_steps == 2000


def test_misspelled_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[job]\ncustom_config_module = "trinity_titan.job_config"\n[moe]\nbalance_metod = "smebu"\n'
    )
    with pytest.raises(ValueError, match="balance_metod"):
        parse(bad)


def documented_layouts() -> list[tuple[Path, list[str]]]:
    """Each TOML's `# plan: ARGS` lines: the layouts (world size, GPU, overrides) it must fit."""
    return [
        (path, shlex.split(line.removeprefix("# plan:")))
        for path in CONFIGS
        for line in path.read_text().splitlines()
        if line.startswith("# plan:")
    ]


def test_every_pretraining_config_documents_a_layout():
    assert {p.stem for p, _ in documented_layouts()} == {
        "trinity_nano",
        "trinity_mini",
        "trinity_large",
    }


@pytest.mark.parametrize(
    "path,layout",
    documented_layouts(),
    ids=[f"{p.stem} {' '.join(a)}" for p, a in documented_layouts()],
)
def test_shipped_config_fits_its_documented_layout(path, layout, capsys):
    """The planner says FITS, with room to spare, for every layout a TOML names."""
    assert plan.main(["--job.config_file", str(path), *layout]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "FITS", out
