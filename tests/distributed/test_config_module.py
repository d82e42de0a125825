"""A Trinity TOML without `[job] custom_config_module`, under both launchers (torchrun, CPU).

`-m trinity_titan.train` adds Trinity's config module itself: Trinity's TOML sections and
command-line options work, and the z-loss it logs is the one in the loss. `-m torchtitan.train`
refuses such a job at start: with Trinity's sections in the TOML, TorchTitan's own parser names
them; without, Trinity's check names the line to add.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from tests.distributed.launch import run_train
from tests.fixtures import DEBUG_TOML

pytestmark = pytest.mark.slow

LINE = 'custom_config_module = "trinity_titan.job_config"'


def without_config_module(folder: Path, *, trinity_sections: bool) -> Path:
    """The debug TOML without the config-module line (and, if asked, without Trinity's keys)."""
    text = DEBUG_TOML.read_text()
    assert LINE in text
    text = text.replace(LINE + "\n", "")
    if not trinity_sections:
        text = text[: text.index("\n[moe]")].replace('attn_type = "sdpa"\n', "")
    path = folder / "no_module.toml"
    path.write_text(text)
    return path


def _scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb_dir,) = glob.glob(str(folder / "tb" / "*"))
    events = EventAccumulator(tb_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_trinity_train_adds_the_module_and_logs_the_z_loss_it_adds(tmp_path):
    config = without_config_module(tmp_path, trinity_sections=True)
    losses, log = run_train(
        tmp_path / "run", 1, "--training.steps", "3", "--loss.z_loss_coeff", "1e-4",
        "--moe.balance_method", "smebu", "--metrics.enable_tensorboard",
        config=config, module="trinity_titan.train",
    )  # fmt: skip
    assert sorted(losses) == [1, 2, 3]
    m = _scalars(tmp_path / "run")
    for step in range(3):
        lse_sq = m["logits/lse_sq_mean"][step]
        z = m["loss/z_loss"][step]
        assert lse_sq > 1.0 and z == pytest.approx(1e-4 * lse_sq, rel=1e-5)
        # TorchTitan's loss is cross-entropy + z-loss; Trinity logs the two terms
        total = m["loss_metrics/global_avg_loss"][step]
        assert total == pytest.approx(m["loss/ce"][step] + z, rel=1e-5)


def test_torchtitan_train_refuses_it_at_start_naming_the_fix(tmp_path):
    plain = without_config_module(tmp_path, trinity_sections=False)
    _, log = run_train(tmp_path / "a", 1, config=plain, check=False, timeout=300)
    assert f"Fix: add {LINE} under [job] in the TOML" in log
    assert "Building trinity" not in log
    # Trinity's sections in the TOML: TorchTitan's parser stops first, naming them.
    with_sections = without_config_module(tmp_path, trinity_sections=True)
    _, log = run_train(tmp_path / "b", 1, config=with_sections, check=False, timeout=300)
    assert "Invalid field names in" in log and "'moe'" in log and "'loss'" in log
