"""The start of a run on one process: the data scan, the resume step and the initial load."""

from __future__ import annotations

import json
import os

import pytest

import trinity_titan  # noqa: F401  (registers the train spec and datasets)
from tests.fixtures import debug_job_config, save_dcp_checkpoint
from trinity_titan.job_config import ConfigError
from trinity_titan.parallel.degrees import resolve_degrees
from trinity_titan.training.run_lock import LOCK_NAME
from trinity_titan.training.run_start import start_run


def _start(cfg):
    return start_run(cfg, resolve_degrees(cfg.parallelism, 1))


def _corpus(path, n: int, bad: dict[int, dict] | None = None) -> str:
    docs = [{"text": f"document {i}"} for i in range(n)]
    for i, doc in (bad or {}).items():
        docs[i] = doc
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def test_the_debug_dataset_file_is_scanned(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 5, {2: {"txt": "x"}})
    cfg = debug_job_config("--job.dump_folder", str(tmp_path / "run"),
                           "--training.dataset_path", corpus)  # fmt: skip
    with pytest.raises(ConfigError, match=r"c.jsonl \(\[training\] dataset 'trinity_debug'\): "
                       r"1 of 5 documents .*line 3 has no field 'text'"):  # fmt: skip
        _start(cfg)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    cfg.training.dataset_path = str(empty)
    with pytest.raises(ConfigError, match=r"e.jsonl .* holds no documents \(it is empty\)"):
        _start(cfg)
    cfg.data.validate = "off"
    assert _start(cfg).scans == []


def test_sources_need_a_document_per_reader(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 3)
    cfg = debug_job_config("--job.dump_folder", str(tmp_path / "run"), "--data.sources", "path",
                           corpus, "--training.dataloader.num_workers", "4")  # fmt: skip
    with pytest.raises(ConfigError, match=r"entry 0 has 3 usable document\(s\), fewer than its 4"):
        _start(cfg)
    cfg.training.dataloader.num_workers = 2
    with pytest.raises(ConfigError, match=r"entry 0 .* has 1 block\(s\) of about "
                       r"--data.jsonl_block_bytes = 4194304 for its 2 readers.*Fix: lower "
                       r"--data.jsonl_block_bytes to \d+ or less"):  # fmt: skip
        _start(cfg)
    cfg.data.jsonl_block_bytes = os.path.getsize(corpus) // 2
    run = _start(cfg)
    assert [s.documents for s in run.scans] == [3]
    assert (tmp_path / "run" / LOCK_NAME).is_file()  # held until the process exits
    run.lock.release()


def test_resume_sets_the_load_step(tmp_path):
    cfg = debug_job_config("--job.dump_folder", str(tmp_path), "--checkpoint.enable")
    save_dcp_checkpoint(tmp_path / "checkpoint" / "step-4", dp_degree=1)
    save_dcp_checkpoint(tmp_path / "checkpoint" / "step-6", full=False)
    run = _start(cfg)
    assert run.resume_step == 4 and cfg.checkpoint.load_step == 4
    run.lock.release()
    with pytest.raises(ConfigError, match=r"num_workers was 0, is 1"):
        cfg.training.dataloader.num_workers = 1
        _start(cfg)


def test_an_initial_load_is_never_ignored(tmp_path):
    seed = save_dcp_checkpoint(tmp_path / "seed" / "step-0", full=False)
    cfg = debug_job_config("--job.dump_folder", str(tmp_path / "run"), "--checkpoint.enable",
                           "--checkpoint.initial_load_path", str(seed))  # fmt: skip
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)  # left empty by an earlier run
    run = _start(cfg)
    assert run.resume_step is None and not (tmp_path / "run" / "checkpoint").exists()
    run.lock.release()
    (tmp_path / "run" / "checkpoint" / "notes").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"initial_load_path = .* would be ignored.*notes"):
        _start(cfg)


def test_replica_groups_share_the_folder_and_leave_the_resume_to_torchtitan(tmp_path):
    """torchft: a group's lock is its own, and a step folder another group is still writing
    (no .metadata yet) is neither judged damaged nor moved."""
    run = tmp_path / "run"
    writing = run / "checkpoint" / "step-4"
    writing.mkdir(parents=True)
    cfg = debug_job_config("--job.dump_folder", str(run), "--checkpoint.enable",
                           "--fault_tolerance.enable", "--fault_tolerance.group_size", "2",
                           "--fault_tolerance.replica_id", "1")  # fmt: skip
    started = _start(cfg)
    try:
        assert started.resume_step is None
        assert writing.is_dir() and not (run / "checkpoint-damaged").exists()
        assert (run / "trinity_run.replica_1.lock").is_file() and not (run / LOCK_NAME).exists()
    finally:
        started.lock.release()
