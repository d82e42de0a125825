"""`python -m trinity_titan.train`: TorchTitan's trainer with Trinity's training-loop additions.

The stock `-m torchtitan.train` trains every Trinity config too; this subclass is where the parts
that need the training loop itself live (they are added by the features that need them).
"""

from __future__ import annotations

from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer, main

from trinity_titan.data.ramp import BatchRamp, mark_ramp_supported


class TrinityTrainer(Trainer):
    """TorchTitan's Trainer; Trinity features override its hooks, never copy its loop."""

    def __init__(self, job_config: JobConfig):
        mark_ramp_supported()  # before the dataloader builder checks for it
        super().__init__(job_config)
        dims = self.parallel_dims
        self._batch_degree = dims.get_mesh("batch").size() if dims.dp_enabled else 1
        self.batch_ramp = BatchRamp.from_job_config(job_config, self._batch_degree)

    def train_step(self, data_iterator):
        """Batch ramp: set gradient accumulation from the global tokens seen before this step."""
        if self.batch_ramp.thresholds:
            tokens = self.ntokens_seen * self._batch_degree  # checkpointed by the Trainer
            accum = self.batch_ramp.grad_accum_at(
                tokens, self.job_config.training.local_batch_size, self._batch_degree
            )
            if accum != self.gradient_accumulation_steps:
                logger.info(
                    f"Batch ramp at {tokens} tokens (step {self.step}): global batch "
                    f"{self.batch_ramp.global_batch_at(tokens)} sequences, "
                    f"gradient accumulation steps {accum}"
                )
                self.gradient_accumulation_steps = accum
        return super().train_step(data_iterator)


if __name__ == "__main__":
    main(TrinityTrainer)
