"""`python -m trinity_titan.train_ft`: Trinity's trainer as one torchft replica group.

TorchTitan 0.2.2's fault tolerance (`[fault_tolerance]`, experimental) runs each replica group of
HSDP as its own torchrun job with a torchft Manager: a group that dies drops out of the gradient
average and the others keep training; a restarted group heals from a live one (weights,
optimizer and LR state, step) and resumes its own data position. `TrinityFTTrainer` is
TorchTitan's `FTTrainer` with Trinity's trainer on top (`TrinityTrainer` first in the MRO: its
hooks wrap FTTrainer's, whose `__init__` re-does Trainer's and still sets `train_spec`, the
property Trinity's components are built from). What Trinity adds spans the live groups:
expert-bias counts (so SMEBU momentum and biases stay identical), the NaN guard's decision, the
metrics and the logged loss (see compat/torchft.py); Muon and AdamW take TorchTitan's torchft
optimizer path (optim/builder.py). A group without FSDP averages its gradients itself.

Each group is launched with its own replica id; a torchft lighthouse must run (see the README):

    TORCHFT_LIGHTHOUSE=http://host:29510 torchrun --nproc_per_node 8 -m trinity_titan.train_ft \\
        --job.config_file train_configs/trinity_nano.toml --fault_tolerance.enable \\
        --fault_tolerance.replica_id 0 --fault_tolerance.group_size 4
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch.distributed.fsdp import FSDPModule
from torchtitan.config import JobConfig
from torchtitan.experiments.ft.train import FTTrainer
from torchtitan.tools.logging import logger
from torchtitan.train import main

from trinity_titan.compat.torchft import ReplicaGroups, restore_scheduled_lrs
from trinity_titan.compat.torchtitan import set_command_line
from trinity_titan.train import StepClosing, TrinityTrainer, with_trinity_config


class TrinityFTTrainer(TrinityTrainer, FTTrainer):
    """One torchft replica group running Trinity's trainer."""

    fault_tolerant: ClassVar[bool] = True

    def __init__(self, job_config: JobConfig) -> None:
        self._backwards = 0
        self._step_started_at = 0
        """`self.step` when the running step began (a heal replaces it with a live group's)."""
        super().__init__(job_config)
        has_fsdp = any(
            isinstance(m, FSDPModule) for part in self.model_parts for m in part.modules()
        )
        self._average_gradients = self.replica_groups is not None and not has_fsdp
        """TorchTitan averages across groups in FSDP's all-reduce hook; without FSDP, here."""
        if self._average_gradients:
            logger.info(
                "Fault tolerance without FSDP: gradients are averaged across the replica groups "
                "after each step's last backward"
            )

    def live_replica_groups(self) -> ReplicaGroups | None:
        manager = self.ft_manager
        return ReplicaGroups(manager.manager) if manager.enabled else None

    def data_parallel_degree(self) -> int:
        """All groups' data-parallel ranks (the global batch is counted over every group)."""
        return self.ft_manager.get_dp_info(super().data_parallel_degree(), 0)[0]

    def train_step(
        self, data_iterator: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]
    ) -> None:
        self._backwards = 0
        self._step_started_at = self.step
        super().train_step(data_iterator)

    def _close_step(self, closing: StepClosing) -> None:
        """After torchft's commit vote, where a healing group has loaded a live group's state:
        give the optimizers the scheduled LRs (compat/torchft.py; a no-op unless this group
        healed), then close the step as usual."""
        if self.replica_groups is not None:
            restore_scheduled_lrs(self.optimizers, self.lr_schedulers)
            if self.replica_groups.healing():
                logger.info(
                    f"Healed from a live replica group: at step {self.step} (this group was at "
                    f"step {self._step_started_at})"
                )
        super()._close_step(closing)

    def forward_backward_step(self, **kwargs: Any) -> torch.Tensor:
        """TorchTitan's; after the step's last backward, a group without FSDP averages its
        gradients across the live groups (before they are clipped)."""
        loss = super().forward_backward_step(**kwargs)
        self._backwards += 1
        if self._average_gradients and self._backwards == self.gradient_accumulation_steps:
            params = [p for part in self.model_parts for p in part.parameters()]
            self.replica_groups.average_gradients(params)
        return loss


if __name__ == "__main__":
    set_command_line(with_trinity_config(sys.argv[1:]))
    main(TrinityFTTrainer)
