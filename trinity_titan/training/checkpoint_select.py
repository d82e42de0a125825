"""Which checkpoint a run resumes from: the newest valid, full one.

TorchTitan resumes from the highest `step-N` folder that has a `.metadata` file, and ends in a bare
traceback when that folder is damaged or holds the model only (its final save, with the default
`checkpoint.last_save_model_only`). Before the model is built, rank 0 inspects every step folder
(trinity_titan/training/run_start.py) and the run loads the chosen step (`checkpoint.load_step`):

- a folder is *damaged* when its `.metadata` is missing or unreadable, a shard it names is missing
  or shorter than the bytes it should hold, or its non-tensor state (train state, data position)
  fails to load. DCP keeps no checksums, so tensor bytes of the right length are trusted;
- a folder is *model-only* when it holds no optimizer, data or schedule state (the final save of
  `last_save_model_only`, an HF export, or the step-0 seed checkpoint).

The newest full, undamaged folder is used, and every newer folder is named in a WARNING. Damaged
folders are moved beside the checkpoint folder (`<folder>-damaged/`), so that a re-save of their
step starts clean. Step 0 (the seed) starts the run from its weights, as in TorchTitan; so does
nothing, when every folder is damaged. A folder whose newer steps hold the model only cannot be
resumed (a new run from step 0 would overwrite them): a ConfigError says what to do.

`check_resume_layout` refuses, before the model is built, a resume on another layout that cannot
continue the data exactly once (data/position.py), or that would change the global batch.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torchtitan.config import JobConfig

from trinity_titan.data.elastic import dataloader_keys, saved_num_workers
from trinity_titan.data.sources import SourceSpec
from trinity_titan.data.validate import local_files
from trinity_titan.job_config import ConfigError

STEP_FOLDER = re.compile(r"step-(\d+)")
FULL_STATE = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")
"""Key prefixes of TorchTitan's checkpoint that a resume needs besides the model."""


@dataclass(frozen=True)
class Layout:
    """What a checkpoint's data position depends on."""

    dp_degree: int
    """Data-parallel ranks (TorchTitan's `dataloader.world_size`)."""
    num_workers: int
    """Dataloader worker processes per rank."""
    global_batch: int = 0
    """Sequences per optimizer step (0: not saved)."""
    exact: bool = True
    """The saved data position is that of the saved step (not an older worker snapshot)."""
    keys: tuple[str, ...] = field(default=(), compare=False)
    """The dataloader's keys in the checkpoint (what a resume on another layout loads)."""

    def same_readers(self, other: Layout) -> bool:
        return (self.dp_degree, self.num_workers) == (other.dp_degree, other.num_workers)


@dataclass(frozen=True)
class StepFolder:
    """One `step-N` folder as found on disk."""

    step: int
    path: Path
    problem: str | None = None
    """Why it is damaged (None: it is not)."""
    full: bool = False
    """It holds the optimizer, data and schedule state, not only the model."""
    layout: Layout | None = None
    """The layout it was saved with (full folders only)."""

    @property
    def resumable(self) -> bool:
        return self.problem is None and self.full


def step_folders(folder: Path) -> list[StepFolder]:
    """Every `step-N` folder in `folder`, inspected, newest first."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = STEP_FOLDER.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append(inspect_step(int(match.group(1)), entry))
    return sorted(found, key=lambda s: s.step, reverse=True)


def inspect_step(step: int, path: Path) -> StepFolder:
    """Check a step folder's files and load its non-tensor state."""
    if (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")):
        return StepFolder(step, path)  # an HF export: model only
    if not (path / ".metadata").is_file():
        return StepFolder(step, path, problem="it has no .metadata (its save did not finish)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is damage
        return StepFolder(
            step, path, problem=f"its .metadata is truncated or unreadable ({_brief(e)})"
        )
    problem = _missing_bytes(path, metadata)
    if problem:
        return StepFolder(step, path, problem=problem)
    keys = metadata.state_dict_metadata
    if not all(any(k.startswith(p) for k in keys) for p in FULL_STATE):
        return StepFolder(step, path)
    try:
        layout = _read_layout(path, dataloader_keys(list(keys)))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - state that does not load is damage
        return StepFolder(step, path, problem=f"its data/train state fails to load ({_brief(e)})")
    return StepFolder(step, path, full=True, layout=layout)


def _brief(e: BaseException) -> str:
    """The last line of an error (DCP's CheckpointException carries each rank's traceback)."""
    text = str(e).strip().splitlines()
    if isinstance(e, CheckpointException) and text:
        return text[-1]
    return f"{type(e).__name__}: {text[-1]}" if text else type(e).__name__


def _missing_bytes(path: Path, metadata: Metadata) -> str | None:
    """A shard that the metadata names and that is missing or too short."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"its shard {name} is missing"
        have = os.path.getsize(shard)
        if have < size:
            return f"its shard {name} is truncated ({have} of {size} bytes)"
    return None


def _read_layout(path: Path, keys: list[str]) -> Layout:
    """Load the data-parallel degree, the global batch and rank 0's dataloader state (a trial
    load of the state a resume needs first). Runs on one rank, without collectives."""
    loader: dict[str, Any] = {"world_size": 0, "dp_rank_0": b""}
    if "global_batch_size" in keys:
        loader["global_batch_size"] = 0
    state: dict[str, Any] = {"dataloader": loader, "train_state": {"step": 0, "ntokens_seen": 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    rank0 = pickle.loads(loader["dp_rank_0"])
    return Layout(
        dp_degree=int(loader["world_size"]),
        num_workers=saved_num_workers(rank0),
        global_batch=int(loader.get("global_batch_size", 0)),
        exact=not rank0.get("_steps_since_snapshot", 0),
        keys=tuple(keys),
    )


@dataclass(frozen=True)
class ResumeChoice:
    """The step to load (None: start fresh) and the newer folders passed over."""

    step: StepFolder | None
    passed_over: tuple[StepFolder, ...] = ()

    @property
    def damaged(self) -> list[StepFolder]:
        return [s for s in self.passed_over if s.problem]

    def warning(self, damaged_folder: Path) -> str | None:
        """The WARNING that names every newer folder not used, and the one used instead."""
        if not self.passed_over:
            return None
        used = f"resuming from {self.step.path.name}" if self.step else "starting from scratch"
        named = "; ".join(f"{s.path.name} {_why_not(s)}" for s in self.passed_over)
        moved = f" Damaged folders were moved to {damaged_folder}." if self.damaged else ""
        return f"Checkpoints not used for resume: {named}. {used.capitalize()}.{moved}"


def _why_not(s: StepFolder) -> str:
    if s.problem:
        return f"is damaged: {s.problem}"
    return (
        "holds the model only (the final save of checkpoint.last_save_model_only; "
        "--checkpoint.no-last-save-model-only makes the final save resumable)"
    )


def choose_resume(folder: Path, load_step: int) -> ResumeChoice:
    """The step folder of `folder` to resume from (see the module docstring)."""
    steps = step_folders(folder)
    if load_step != -1:
        chosen = next((s for s in steps if s.step == load_step), None)
        if chosen is None or chosen.problem or not (chosen.full or chosen.step == 0):
            why = "does not exist" if chosen is None else _why_not(chosen)
            raise ConfigError(
                f"[checkpoint] load_step = {load_step}: {folder}/step-{load_step} {why}. Fix: "
                "leave --checkpoint.load_step at -1 (the newest valid checkpoint) or choose one "
                f"of: {', '.join(s.path.name for s in steps if s.resumable) or 'none'}."
            )
        return ResumeChoice(chosen)
    newer: list[StepFolder] = []
    for s in steps:
        if s.resumable:
            return ResumeChoice(s, tuple(newer))
        if s.step == 0 and s.problem is None and not any(n.problem is None for n in newer):
            return ResumeChoice(s, tuple(newer))  # the seed checkpoint: TorchTitan loads its model
        newer.append(s)
    model_only = [s for s in newer if s.problem is None]
    if model_only:
        named = "; ".join(f"{s.path.name} {_why_not(s)}" for s in newer)
        raise ConfigError(
            f"[checkpoint] folder {folder} holds no checkpoint a run can resume from ({named}). "
            "Fix: to go on from the weights, start a new run in another --job.dump_folder with "
            "--checkpoint.initial_load_path <that step folder> (the data position and optimizer "
            "state are not in it); to start over here, move those step folders away."
        )
    return ResumeChoice(None, tuple(newer))


def damaged_folder(folder: Path) -> Path:
    """Where damaged step folders of checkpoint folder `folder` are moved: beside it, where
    TorchTitan neither resumes from them nor purges them."""
    return folder.with_name(f"{folder.name}-damaged")


def set_aside(damaged: list[StepFolder], folder: Path) -> None:
    """Move damaged step folders out of checkpoint folder `folder` (kept for inspection; a later
    save of the same step then writes a new folder instead of over the damaged files)."""
    target_dir = damaged_folder(folder)
    for s in damaged:
        target_dir.mkdir(parents=True, exist_ok=True)
        target, n = target_dir / s.path.name, 1
        while target.exists():
            target, n = target_dir / f"{s.path.name}.{n}", n + 1
        s.path.rename(target)


def check_resume_layout(saved: Layout, now: Layout, step: str, job_config: JobConfig) -> None:
    """Refuse, with the fix, a resume whose data cannot continue exactly once on the new layout,
    or whose global batch would change without `training.global_batch_size` saying so."""
    sources = [SourceSpec.from_dict(d) for d in job_config.data.sources]
    refused = None
    if not saved.same_readers(now):
        was = (
            f"the data-parallel degree (data_parallel_replicate_degree x "
            f"data_parallel_shard_degree) was {saved.dp_degree}, is {now.dp_degree}; "
            f"[training.dataloader] num_workers was {saved.num_workers}, is {now.num_workers}"
        )
        hub = [s.path for s in sources if not local_files(s.path)]
        if not sources and saved.num_workers != now.num_workers:
            refused = f"{was}, and the debug loader resumes with its saved num_workers only"
        elif hub:
            refused = f"{was}, and the position in hub dataset {hub[0]!r} cannot be resharded"
        elif not saved.exact:
            refused = (
                f"{was}, and its data position is older than the step (saved with [data] "
                "snapshot_every_n_batches > 1), so it cannot be resharded"
            )
    if refused:
        raise ConfigError(
            f"cannot resume from {step}: {refused}. Fix: resume with the saved values, or "
            "start a new run from its weights in another --job.dump_folder "
            f"(--checkpoint.initial_load_path {step} --checkpoint.initial_load_model_only)."
        )
    if (
        saved.global_batch
        and job_config.training.global_batch_size < 0
        and saved.global_batch != now.global_batch
    ):
        raise ConfigError(
            f"cannot resume from {step}: its global batch was {saved.global_batch} sequences and "
            f"would be {now.global_batch} (training.local_batch_size x the data-parallel degree). "
            f"Fix: --training.global_batch_size {saved.global_batch} keeps it (gradient "
            "accumulation makes up the difference); another value changes it on purpose."
        )
