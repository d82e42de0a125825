"""Resume picks the newest valid, full checkpoint; damage and model-only folders are named."""

from __future__ import annotations

import os

import pytest

from tests.fixtures import debug_job_config, save_dcp_checkpoint
from trinity_titan.job_config import ConfigError
from trinity_titan.training.checkpoint_select import (
    Layout,
    check_resume_layout,
    choose_resume,
    damaged_folder,
    inspect_step,
    set_aside,
)


def _shard(step_dir):
    return next(p for p in step_dir.iterdir() if p.suffix == ".distcp")


def test_a_full_checkpoint_is_resumable_with_its_layout(tmp_path):
    s = inspect_step(3, save_dcp_checkpoint(tmp_path / "step-3", dp_degree=2, num_workers=4))
    assert s.resumable and s.problem is None
    assert s.layout == Layout(dp_degree=2, num_workers=4, global_batch=16)
    assert "dp_rank_1" in s.layout.keys and "global_batch_size" in s.layout.keys
    single = inspect_step(3, save_dcp_checkpoint(tmp_path / "other", num_workers=0))
    assert single.layout == Layout(dp_degree=1, num_workers=0, global_batch=8)
    stale = save_dcp_checkpoint(tmp_path / "stale", num_workers=2, steps_since_snapshot=3)
    assert not inspect_step(3, stale).layout.exact


def test_each_kind_of_damage_is_named(tmp_path):
    truncated = save_dcp_checkpoint(tmp_path / "step-1")
    shard = _shard(truncated)
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    assert inspect_step(1, truncated).problem == (
        f"its shard {shard.name} is truncated ({size // 2} of {size} bytes)"
    )

    missing = save_dcp_checkpoint(tmp_path / "step-2")
    _shard(missing).unlink()
    assert "is missing" in inspect_step(2, missing).problem

    bad_meta = save_dcp_checkpoint(tmp_path / "step-3")
    os.truncate(bad_meta / ".metadata", 100)
    assert "its .metadata is truncated or unreadable" in inspect_step(3, bad_meta).problem

    unfinished = save_dcp_checkpoint(tmp_path / "step-4")
    (unfinished / ".metadata").unlink()
    assert "has no .metadata" in inspect_step(4, unfinished).problem

    # bytes of the right length that do not load: the data position is unreadable
    garbled = save_dcp_checkpoint(tmp_path / "step-5")
    shard = _shard(garbled)
    shard.write_bytes(b"\0" * shard.stat().st_size)
    assert "fails to load" in inspect_step(5, garbled).problem


def test_newest_valid_full_checkpoint_wins_and_newer_ones_are_named(tmp_path):
    ckpt = tmp_path / "checkpoint"
    save_dcp_checkpoint(ckpt / "step-2")
    save_dcp_checkpoint(ckpt / "step-4")
    os.truncate(_shard(save_dcp_checkpoint(ckpt / "step-6")), 10)
    save_dcp_checkpoint(ckpt / "step-8", full=False)  # the final, model-only save
    choice = choose_resume(ckpt, load_step=-1)
    assert choice.step.step == 4
    assert [s.step for s in choice.passed_over] == [8, 6]
    warning = choice.warning(damaged_folder(ckpt))
    assert "step-8 holds the model only" in warning and "no-last-save-model-only" in warning
    assert "step-6 is damaged: its shard" in warning and "Resuming from step-4." in warning
    set_aside(choice.damaged, ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2", "step-4", "step-8"]
    assert (tmp_path / "checkpoint-damaged" / "step-6").is_dir()


def test_only_model_only_checkpoints_cannot_be_resumed(tmp_path):
    ckpt = tmp_path / "checkpoint"
    save_dcp_checkpoint(ckpt / "step-0", full=False)  # a seed
    save_dcp_checkpoint(ckpt / "step-5", full=False)  # a finished run's final save
    with pytest.raises(
        ConfigError, match=r"no checkpoint a run can resume from.*initial_load_path"
    ):
        choose_resume(ckpt, load_step=-1)


def test_the_seed_checkpoint_starts_a_run_and_damage_alone_starts_fresh(tmp_path):
    ckpt = tmp_path / "checkpoint"
    save_dcp_checkpoint(ckpt / "step-0", full=False)
    assert choose_resume(ckpt, -1).step.step == 0
    (save_dcp_checkpoint(ckpt / "step-3") / ".metadata").unlink()  # killed during its save
    choice = choose_resume(ckpt, -1)
    assert choice.step.step == 0 and [s.step for s in choice.damaged] == [3]
    other = tmp_path / "fresh"
    (save_dcp_checkpoint(other / "step-3") / ".metadata").unlink()
    assert choose_resume(other, -1).step is None
    assert choose_resume(tmp_path / "none", -1).step is None


def test_an_explicit_load_step_must_be_valid(tmp_path):
    ckpt = tmp_path / "checkpoint"
    save_dcp_checkpoint(ckpt / "step-2")
    os.truncate(_shard(save_dcp_checkpoint(ckpt / "step-4")), 10)
    assert choose_resume(ckpt, 2).step.step == 2
    with pytest.raises(ConfigError, match=r"load_step = 4: .*step-4 is damaged.*step-2"):
        choose_resume(ckpt, 4)
    with pytest.raises(ConfigError, match=r"load_step = 7: .*does not exist"):
        choose_resume(ckpt, 7)


def _job(sources=(), global_batch_size=-1):
    cfg = debug_job_config("--training.global_batch_size", str(global_batch_size))
    cfg.data.sources = list(sources)
    return cfg


def test_a_changed_layout_resumes_where_the_data_can_be_resharded(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    local = [{"path": str(tmp_path / "a.jsonl")}]
    # local sources: any change of ranks and workers
    check_resume_layout(Layout(2, 1, 4), Layout(4, 2, 4), "step-3", _job(local))
    # the debug loader: another data-parallel degree, the same workers
    check_resume_layout(Layout(2, 1, 4), Layout(4, 1, 4), "step-3", _job())
    with pytest.raises(ConfigError) as e:
        check_resume_layout(Layout(2, 1, 4), Layout(4, 2, 4), "step-3", _job())
    message = str(e.value)
    assert "data-parallel degree" in message and "was 2, is 4" in message
    assert "num_workers was 1, is 2" in message and "initial_load_path step-3" in message
    assert "debug loader resumes with its saved num_workers only" in message
    hub = [{"path": "allenai/c4", "name": "en"}]
    with pytest.raises(ConfigError, match="hub dataset 'allenai/c4' cannot be resharded"):
        check_resume_layout(Layout(2, 1, 4), Layout(1, 1, 4), "step-3", _job(hub))
    check_resume_layout(Layout(2, 1, 4), Layout(2, 1, 4), "step-3", _job(hub))
    with pytest.raises(ConfigError, match="older than the step"):
        check_resume_layout(Layout(2, 1, 4, exact=False), Layout(1, 1, 2), "s", _job(local))


def test_the_global_batch_is_kept_or_changed_on_purpose(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    local = [{"path": str(tmp_path / "a.jsonl")}]
    with pytest.raises(ConfigError, match=r"global batch was 8 sequences and would be 4.*"
                       r"--training.global_batch_size 8 keeps it"):  # fmt: skip
        check_resume_layout(Layout(4, 0, 8), Layout(2, 0, 4), "step-3", _job(local))
    check_resume_layout(Layout(4, 0, 8), Layout(2, 0, 8), "step-3", _job(local, 8))
    check_resume_layout(Layout(4, 0, 8), Layout(2, 0, 16), "step-3", _job(local, 16))
