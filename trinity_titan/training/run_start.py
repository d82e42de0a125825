"""What a run does once its process group exists, before it builds the model.

1. Rank 0 takes the lock of the output folders (training/run_lock.py): one run per folder.
2. Rank 0 chooses the checkpoint to resume from (training/checkpoint_select.py), moves damaged
   step folders aside and checks that the resume's layout can be honoured; every rank then loads
   that step (`checkpoint.load_step`).
3. The local data files are scanned (data/validate.py), each rank a share of them.

Both launchers call `start_run`: Trinity's trainer right after the process group is created,
TorchTitan's trainer from the TrainSpec's tokenizer builder (after the job check). Every decision
is made once and shared, so that all ranks raise the same ConfigError and stop together.

Under torchft the replica groups share their output folders: each group takes a lock of its
own, and the resume choice is TorchTitan's (the newest step folder that has a .metadata): other
groups may be writing into the checkpoint folder, so no folder is judged damaged or moved, and
a checkpoint saved by another group holds that group's data position, not this one's.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import DATASETS
from torchtitan.tools.logging import logger

from trinity_titan.data.datasets import TRINITY_DATASETS
from trinity_titan.data.elastic import global_batch_size
from trinity_titan.data.sources import SourceSpec, local_corpus
from trinity_titan.data.validate import (
    FileScan,
    check_scans,
    file_tasks,
    local_files,
    scan_file,
    share,
)
from trinity_titan.job_config import ConfigError
from trinity_titan.parallel.degrees import Degrees, replica_groups
from trinity_titan.training.checkpoint_select import (
    Layout,
    ResumeChoice,
    check_resume_layout,
    choose_resume,
    damaged_folder,
    set_aside,
)
from trinity_titan.training.run_lock import RunLock, lock_name, output_folders

T = TypeVar("T")


@dataclass
class RunStart:
    """What `start_run` decided (the lock is held by rank 0 only)."""

    lock: RunLock | None
    resume_step: int | None
    """The checkpoint step every rank loads (None: none, or checkpointing is off)."""
    scans: list[FileScan]
    reshard_keys: list[str] | None = None
    """The checkpoint's dataloader keys when it was saved on another layout: the dataloader
    loads all of them and reshards the data position (data/elastic.py); None: same layout."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, its result broadcast to every rank; a ConfigError of rank 0 is raised on
    every rank."""
    rank, world = _rank_world()
    result: Any = None
    error: str | None = None
    if rank == 0:
        try:
            result = fn()
        except ConfigError as e:
            error = str(e)
    if world > 1:
        payload = [error, result]
        dist.broadcast_object_list(payload, src=0)
        error, result = payload
    if error is not None:
        raise ConfigError(error)
    return result


def start_run(job_config: JobConfig, degrees: Degrees) -> RunStart:
    """Lock, choose the resume step, validate the data; ConfigError on every rank on a problem."""
    lock = take_lock(job_config)
    resume_step, reshard_keys = on_rank0(lambda: choose_resume_step(job_config, degrees))
    if resume_step is not None:
        job_config.checkpoint.load_step = resume_step
    scans = validate_data(job_config, degrees)
    on_rank0(lambda: check_enough_blocks(job_config, degrees))
    return RunStart(lock, resume_step, scans, reshard_keys)


def _checkpoint_folder(job_config: JobConfig) -> Path:
    return Path(job_config.job.dump_folder) / job_config.checkpoint.folder


def take_lock(job_config: JobConfig) -> RunLock | None:
    """Rank 0 takes the output folders' lock (released at exit); None on other ranks or when
    `[run_lock] enable` is off."""
    if not job_config.run_lock.enable:
        return None
    checkpoint = job_config.checkpoint.folder if job_config.checkpoint.enable else None
    ft = job_config.fault_tolerance
    name = lock_name(ft.replica_id if ft.enable else None)
    folders = output_folders(job_config.job.dump_folder, checkpoint, name)
    lock = RunLock(folders, job_config.run_lock) if _rank_world()[0] == 0 else None

    def acquire() -> None:
        lock.acquire()
        atexit.register(lock.release)

    on_rank0(acquire)
    return lock


def choose_resume_step(
    job_config: JobConfig, degrees: Degrees
) -> tuple[int | None, list[str] | None]:
    """Rank 0: the step to resume from, after moving damaged folders aside (None: start fresh),
    and the dataloader keys to reshard from when its layout differs (None: it does not)."""
    checkpoint = job_config.checkpoint
    if not checkpoint.enable or checkpoint.create_seed_checkpoint:
        return None, None
    if job_config.fault_tolerance.enable:
        logger.info(
            "Fault tolerance: TorchTitan resumes from the newest checkpoint step that has a "
            ".metadata (other replica groups may be writing the folder; see run_start.py), and "
            "each group's data position comes from its own ft-replicat-<id> folder"
        )
        return None, None
    folder = _checkpoint_folder(job_config)
    choice: ResumeChoice = choose_resume(folder, checkpoint.load_step)
    chosen = choice.step
    reshard_keys = None
    if chosen is not None and chosen.layout is not None:
        dp = degrees.dp_replicate * degrees.dp_shard
        now = Layout(dp, job_config.training.dataloader.num_workers,
                     global_batch_size(job_config, dp))  # fmt: skip
        check_resume_layout(chosen.layout, now, str(chosen.path), job_config)
        if not chosen.layout.same_readers(now):
            reshard_keys = list(chosen.layout.keys)
            logger.info(
                f"Resuming {chosen.path.name} on another layout: {chosen.layout.dp_degree} -> "
                f"{dp} data-parallel ranks, {chosen.layout.num_workers} -> {now.num_workers} "
                "workers; the data position is resharded"
            )
    set_aside(choice.damaged, folder)
    warning = choice.warning(damaged_folder(folder))
    if warning:
        logger.warning(warning)
    if chosen is None and folder.is_dir():
        _leave_no_empty_folder(folder, checkpoint.initial_load_path)
    return (chosen.step, reshard_keys) if chosen is not None else (None, None)


def _leave_no_empty_folder(folder: Path, initial_load_path: str) -> None:
    """TorchTitan ignores `initial_load_path` when the checkpoint folder exists: with nothing to
    resume from, remove an empty folder, and refuse a folder with other contents."""
    if not initial_load_path:
        return
    if not any(folder.iterdir()):
        folder.rmdir()
        return
    raise ConfigError(
        f"[checkpoint] initial_load_path = {initial_load_path!r} would be ignored: the checkpoint "
        f"folder {folder} exists (with {', '.join(sorted(p.name for p in folder.iterdir()))}) "
        "and TorchTitan then resumes from it instead. Fix: move that folder away, or set "
        "--job.dump_folder to a new folder."
    )


def data_entries(job_config: JobConfig) -> list[tuple[str, str, str]]:
    """(path, text_field, label) of each local source the scan covers; hub sources are logged."""
    data = job_config.data
    if not data.sources:
        training = job_config.training
        if training.dataset not in TRINITY_DATASETS:
            return []  # TorchTitan's datasets have their own sample processors
        path = training.dataset_path or DATASETS[training.dataset].path
        return [(path, "text", f"[training] dataset {training.dataset!r}")]
    entries = []
    for i, source in enumerate(data.sources):
        spec = SourceSpec.from_dict(source)
        path, text_field = spec.path, spec.text_field
        if local_files(path):  # what the reader treats as local files (data/sources.py)
            entries.append((path, text_field, f"[[data.sources]] entry {i}"))
        else:
            logger.info(
                f"[[data.sources]] entry {i} ({path!r}) is not a local path: it is streamed "
                "without a scan. Each of its documents is checked when it is read (a field "
                f"{text_field!r} holding non-blank text); a bad one ends the run naming the "
                "source and its position, or is skipped with [data] on_bad_document = 'skip'."
            )
    return entries


def validate_data(job_config: JobConfig, degrees: Degrees) -> list[FileScan]:
    """Scan this rank's share of the local data files, gather every rank's findings, and raise
    the first problem on every rank (see data/validate.py)."""
    data = job_config.data
    if data.validate == "off":
        return []
    rank, world = _rank_world()
    entries = data_entries(job_config)
    tasks = file_tasks(entries)
    head = data.validate_head_docs if data.validate == "head" else None
    start = time.perf_counter()
    mine = [scan_file(t.path, t.text_field, head, t.source) for t in share(tasks, rank, world)]
    seconds = time.perf_counter() - start
    gathered: list[Any] = [(mine, seconds)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (mine, seconds))
    scans = [s for part, _ in gathered for s in part]
    on_bad = data.on_bad_document if data.sources else "error"  # the debug loader cannot skip
    warnings = check_scans(scans, on_bad)
    if data.sources and data.validate == "full":
        check_enough_documents(
            scans,
            entries,
            degrees,
            job_config.training.dataloader.num_workers,
            replica_groups(job_config),
        )
    if rank == 0 and scans:
        wall = max(s for _, s in gathered)
        n = sum(s.documents for s in scans)
        logger.info(
            f"Data check ([data] validate = {data.validate!r}): {len(scans)} file(s), {n:,} "
            f"documents in {wall:.1f} s over {world} rank(s) ({n / max(wall, 1e-9):,.0f} "
            "documents/s)"
        )
        for w in warnings:
            logger.warning(w)
    return scans


def check_enough_documents(
    scans: list[FileScan],
    entries: list[tuple[str, str, str]],
    degrees: Degrees,
    num_workers: int,
    groups: int = 1,
) -> None:
    """Every (data-parallel rank, worker) reader of a source needs at least one document; under
    torchft every replica group has its own readers."""
    dp_degree = degrees.dp_replicate * degrees.dp_shard * groups
    readers = dp_degree * max(1, num_workers)
    for _, _, label in entries:
        usable = sum(s.usable for s in scans if s.source == label)
        if usable < readers:
            raise ConfigError(
                f"{label} has {usable} usable document(s), fewer than its {readers} readers "
                f"(data-parallel degree {dp_degree} x "
                f"max(1, num_workers = {num_workers})): some reader would get none. Fix: add "
                "documents, or lower --training.dataloader.num_workers."
            )


def check_enough_blocks(job_config: JobConfig, degrees: Degrees) -> None:
    """Every reader of a local source needs at least one of its blocks (data/blocks.py); under
    torchft every replica group has its own readers."""
    data = job_config.data
    num_workers = job_config.training.dataloader.num_workers
    dp_degree = degrees.dp_replicate * degrees.dp_shard * replica_groups(job_config)
    readers = dp_degree * max(1, num_workers)
    for i, source in enumerate(data.sources):
        corpus = local_corpus(
            SourceSpec.from_dict(source), data.jsonl_block_bytes, data.table_block_rows
        )
        if corpus is None or len(corpus) >= readers:
            continue
        if corpus.kind == "json":
            size = sum(os.path.getsize(f) for f in corpus.files)
            unit = f"of about --data.jsonl_block_bytes = {data.jsonl_block_bytes}"
            fix = f"lower --data.jsonl_block_bytes to {max(1, size // readers)} or less"
        else:
            unit = f"of --data.table_block_rows = {data.table_block_rows}"
            rows = data.table_block_rows * len(corpus)
            fix = f"lower --data.table_block_rows to {max(1, rows // readers)} or less"
        raise ConfigError(
            f"[[data.sources]] entry {i} ({source['path']!r}) has {len(corpus)} block(s) {unit} "
            f"for its {readers} readers (data-parallel degree {dp_degree} x "
            f"max(1, num_workers = {num_workers})): "
            f"some reader would get none. Fix: {fix}, or lower "
            "--training.dataloader.num_workers."
        )
