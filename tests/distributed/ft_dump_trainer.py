"""Test helper: `-m tests.distributed.ft_dump_trainer` trains like trinity_titan.train_ft and, after
every step, writes this rank's model state (weights, expert biases, SMEBU momenta) and optimizer
state (Muon momentum, AdamW moments) to
<dump_folder>/ft_state/replica_<R>_rank<r>/step-<N>.pt, keeping the newest few."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torchtitan.train import main

from trinity_titan.compat.torchtitan import set_command_line
from trinity_titan.train import with_trinity_config
from trinity_titan.train_ft import TrinityFTTrainer

KEEP = 8
"""Dumps kept per rank (older ones are deleted: the test compares recent common steps)."""


class FTDumpTrainer(TrinityFTTrainer):
    def train_step(self, data_iterator) -> None:
        super().train_step(data_iterator)
        replica = self.job_config.fault_tolerance.replica_id
        folder = (
            Path(self.job_config.job.dump_folder)
            / "ft_state"
            / f"replica_{replica}_rank{int(os.environ['RANK'])}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"model.{k}": _local(v) for k, v in self.model_parts[0].state_dict().items()}
        for i, optimizer in enumerate(self.optimizers.optimizers):
            for index, values in optimizer.state_dict()["state"].items():
                for name, value in values.items():
                    state[f"optim{i}.{index}.{name}"] = _local(torch.as_tensor(value))
        tmp = folder / f".step-{self.step}.pt"
        torch.save(state, tmp)
        os.replace(tmp, folder / f"step-{self.step}.pt")  # whole files only
        dumps = sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        for old in dumps[:-KEEP]:
            old.unlink()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard, detached and copied (a DTensor's local tensor)."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


if __name__ == "__main__":
    set_command_line(with_trinity_config(sys.argv[1:]))
    main(FTDumpTrainer)
