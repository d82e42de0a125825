"""`python -m trinity_titan.train`: TorchTitan's trainer with Trinity's training-loop additions.

The stock `-m torchtitan.train` trains every Trinity config too; this subclass is where the parts
that need the training loop itself live (they are added by the features that need them).
"""

from __future__ import annotations

import os

from torchtitan.distributed import ParallelDims
from torchtitan.train import Trainer, main

from trinity_titan.parallel_degrees import check_job_parallelism


class TrinityTrainer(Trainer):
    """TorchTitan's Trainer; Trinity features override its hooks, never copy its loop."""

    def init_distributed(self) -> ParallelDims:
        # Trinity's layout checks (one message naming the option) before any mesh is built.
        check_job_parallelism(self.job_config, int(os.environ["WORLD_SIZE"]))
        return super().init_distributed()


if __name__ == "__main__":
    main(TrinityTrainer)
