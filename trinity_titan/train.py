"""`python -m trinity_titan.train`: TorchTitan's trainer with Trinity's training-loop additions.

The stock `-m torchtitan.train` trains every Trinity config too; this subclass adds what needs the
training loop itself: the NaN/inf guard (`[nan_guard]`).
"""

from __future__ import annotations

from torchtitan.config import JobConfig
from torchtitan.train import Trainer, main

from trinity_titan.nan_guard import NanGuard


class TrinityTrainer(Trainer):
    """TorchTitan's Trainer; Trinity features override its hooks, never copy its loop."""

    def __init__(self, job_config: JobConfig):
        super().__init__(job_config)
        self.nan_guard = NanGuard(
            job_config.nan_guard, self.model_parts, lambda: self.step, self._checkpoint_now
        )
        if self.nan_guard.enabled:
            self.loss_fn = self.nan_guard.watch_loss(self.loss_fn)
            self.optimizers.step = self.nan_guard.guard_step(self.optimizers.step)

    def _checkpoint_now(self, step: int) -> None:
        """A full, resumable checkpoint of `step` now (TorchTitan's last-step save may be weights only)."""
        if not self.checkpointer.enable:
            return
        interval = self.checkpointer.interval
        self.checkpointer.interval = 1
        try:
            self.checkpointer.save(step)
        finally:
            self.checkpointer.interval = interval


if __name__ == "__main__":
    main(TrinityTrainer)
