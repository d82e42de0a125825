"""Time the optimizer step as a fraction of the training step (docs/benchmarks.md).

    torchrun --nproc_per_node 1 --standalone scripts/bench_optimizer_step.py \
        --job.config_file train_configs/trinity_debug.toml --optimizer.name Muon

Every train_step and optimizers.step() is timed; the first `WARMUP` steps are left out. Rank 0
prints one line: mean step time, mean optimizer-step time, and their ratio.
"""

from __future__ import annotations

import time

import torch.distributed as dist
from torchtitan.train import Trainer, main

WARMUP = 3


class TimedTrainer(Trainer):
    """TorchTitan's Trainer with wall-clock timers around train_step and optimizers.step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_times: list[float] = []
        self.optim_times: list[float] = []
        step = self.optimizers.step

        def timed_step(*a, **k):
            start = time.perf_counter()
            step(*a, **k)
            self.optim_times.append(time.perf_counter() - start)

        self.optimizers.step = timed_step

    def train_step(self, *args, **kwargs):
        start = time.perf_counter()
        super().train_step(*args, **kwargs)
        self.step_times.append(time.perf_counter() - start)

    def close(self) -> None:
        steps, optim = self.step_times[WARMUP:], self.optim_times[WARMUP:]
        if steps and (not dist.is_initialized() or dist.get_rank() == 0):
            mean_step, mean_optim = sum(steps) / len(steps), sum(optim) / len(optim)
            print(
                f"BENCH optimizer={self.job_config.optimizer.name} steps={len(steps)} "
                f"step_ms={1e3 * mean_step:.1f} optimizer_ms={1e3 * mean_optim:.1f} "
                f"fraction={mean_optim / mean_step:.3f}",
                flush=True,
            )
        super().close()


if __name__ == "__main__":
    main(TimedTrainer)
