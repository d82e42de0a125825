"""TorchTitan's ParallelAwareDataloader, resumable on another layout.

TorchTitan saves each data-parallel rank's torchdata state under `dp_rank_<r>` and refuses a
checkpoint of another data-parallel degree; torchdata refuses another `num_workers`. This loader
also saves the layout's batch (local and global sequences) and, when the layout changed, loads
the states of *all* saved ranks (`expect_resume` names them before the load: DCP loads what the
template holds) and turns them into its own readers' states (data/position.py). With the saved
layout it loads its own rank's state as TorchTitan does, and resumes bitwise.

The debug loader reads one stream on every rank (data/debug_loader.py): any rank's state is every
rank's, so another data-parallel degree loads rank 0's.
"""

from __future__ import annotations

import pickle
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.config import JobConfig

from trinity_titan.data.position import ReaderState, reshard
from trinity_titan.job_config import ConfigError

RANK_KEY = "dp_rank_"
"""TorchTitan's key prefix of a rank's dataloader state."""


def reader_states(loader_state: dict[str, Any]) -> list[ReaderState]:
    """The dataset states of one rank's torchdata StatefulDataLoader state, one per worker.
    A multi-process state keeps them in `_snapshot._worker_snapshots`, fresh only when the last
    batch was snapshotted (`[data] snapshot_every_n_batches = 1`)."""
    snapshot = loader_state.get("_snapshot")
    if not snapshot:
        return [loader_state["dataset_state"]]
    if loader_state["_steps_since_snapshot"]:
        raise ConfigError(
            "the checkpoint's data position is older than its step (saved with [data] "
            "snapshot_every_n_batches > 1), so it cannot be resharded. Fix: resume with the "
            "saved data-parallel degree and num_workers."
        )
    workers = snapshot["_worker_snapshots"]
    return [workers[f"worker_{w}"]["dataset_state"] for w in range(len(workers))]


class ElasticDataloader(ParallelAwareDataloader):
    """`ParallelAwareDataloader` whose state can be loaded on another layout (module docstring).
    `global_batch_size`: sequences per optimizer step, saved so that a resume can check it."""

    def __init__(
        self,
        dataset,
        dp_rank: int,
        dp_world_size: int,
        *,
        global_batch_size: int,
        dp_invariant: bool = False,
        **kwargs: Any,
    ):
        super().__init__(dataset, dp_rank, dp_world_size, **kwargs)
        self.global_batch_size = global_batch_size
        self.dp_invariant = dp_invariant
        self._resume_keys: list[str] | None = None

    def expect_resume(self, keys: list[str]) -> None:
        """The next load is of a checkpoint of another layout, whose dataloader keys are `keys`."""
        self._resume_keys = list(keys)

    def state_dict(self) -> dict[str, Any]:
        if self._resume_keys is not None:  # the template of a load: every saved key
            return {k: (b"" if k.startswith(RANK_KEY) else 0) for k in self._resume_keys}
        return {
            **super().state_dict(),
            "local_batch_size": self.batch_size,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_keys = None
        if not state_dict:
            return
        ranks = {
            int(k[len(RANK_KEY) :]): v for k, v in state_dict.items() if k.startswith(RANK_KEY)
        }
        saved_world = int(state_dict["world_size"])
        if saved_world == self.dp_world_size and self._rank_id in state_dict:
            state = pickle.loads(state_dict[self._rank_id])
            if saved_num_workers(state) == self.num_workers:
                StatefulDataLoader.load_state_dict(self, state)
                return
        if self.dp_invariant:
            state = pickle.loads(ranks[min(ranks)])
            if saved_num_workers(state) != self.num_workers:
                raise ConfigError(
                    "the debug loader resumes with the saved [training.dataloader] num_workers "
                    f"only ({saved_num_workers(state)}). Fix: set it back."
                )
            StatefulDataLoader.load_state_dict(self, state)
            return
        if sorted(ranks) != list(range(saved_world)):
            raise ConfigError(
                f"the checkpoint's data position was saved by {saved_world} data-parallel ranks "
                f"and this run has {self.dp_world_size} (or another num_workers): resuming on "
                "another layout needs `python -m trinity_titan.train`, which loads every rank's "
                "position."
            )
        states = {r: pickle.loads(v) for r, v in ranks.items()}
        readers = [r for rank in sorted(states) for r in reader_states(states[rank])]
        workers = max(1, self.num_workers)
        new = reshard(readers, self.dp_world_size * workers)
        first = self.dp_rank * workers
        self.dataset.resume_readers({s: new[s] for s in range(first, first + workers)})


def saved_num_workers(loader_state: dict[str, Any]) -> int:
    """Worker processes of a torchdata StatefulDataLoader state: a multi-process state keeps
    them in `_snapshot._main_snapshot._num_workers`; a single-process state has no `_snapshot`."""
    snapshot = loader_state.get("_snapshot")
    return int(snapshot["_main_snapshot"]["_num_workers"]) if snapshot else 0


def dataloader_keys(metadata_keys: list[str]) -> list[str]:
    """The dataloader's keys among a checkpoint's DCP metadata keys ("dataloader.<key>")."""
    prefix = "dataloader."
    return sorted(k[len(prefix) :] for k in metadata_keys if k.startswith(prefix))


def global_batch_size(job_config: JobConfig, dp_world_size: int) -> int:
    """Sequences per optimizer step at the start: `training.global_batch_size`, or (-1) the
    local batch times the data-parallel degree."""
    training = job_config.training
    if training.global_batch_size > 0:
        return training.global_batch_size
    return training.local_batch_size * dp_world_size
