"""Work-arounds for TorchTitan 0.2.2 itself (its CPU gaps are in compat/cpu.py).

- `OwnsTrainSpec`: TorchTitan's `Trainer.__init__` looks the registered TrainSpec up
  (`self.train_spec = get_train_spec(...)`) and builds every component from it, with no hook in
  between. Declaring `train_spec` a property lets a Trainer subclass hand TorchTitan a spec of its
  own, whose builders are bound to the trainer, so the components they build share its state by
  reference instead of through module globals.
- `save_full_checkpoint`: 0.2.2's CheckpointManager saves only on its interval (or a last-step
  save, which may be model-only); a run that must stop now needs a full, resumable save, finished
  before the process exits (an async save would be cut short).
- `checkpoint_folder`: where CheckpointManager saved a step (its naming is private).
- `metric_backends`: MetricsProcessor keeps its TensorBoard and wandb loggers in a private list;
  per-backend logging (histograms, charts, text) needs each one.
- `set_wandb_tags`: WandBLogger passes WANDB_RUN_TAGS to wandb.init as one string, which wandb
  turns into one tag per character; the run's tags are set after init instead.
- `set_command_line`: `ConfigManager.parse_args(args=sys.argv[1:])` binds its default when
  torchtitan.config is imported, so `torchtitan.train.main` parses the command line as it was
  then, and a launcher that adds arguments (`python -m trinity_titan.train` adds Trinity's
  config module) must set that default instead of sys.argv.
- `exit_on_config_error`: `Trainer.__init__` and `Trainer.train` are wrapped in torch elastic's
  `@record`, which writes any exception with its traceback into the error file that torchrun
  prints. A ConfigError is the user's to fix, not a crash: it becomes one `error: ...` line and
  exit status 2 (SystemExit passes `@record` and TorchTitan's `main` untouched).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.metrics import (
    BaseLogger,
    LoggerContainer,
    TensorBoardLogger,
    WandBLogger,
)
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import TrainSpec
from torchtitan.train import Trainer

from trinity_titan.job_config import ConfigError

CONFIG_ERROR_EXIT = 2
"""Exit status of a run stopped by a ConfigError (argparse's status for bad arguments)."""

_RANK0_GRACE_S = 10.0
"""How long the other ranks wait for rank 0 to print an error they all raise: torchrun ends
every worker as soon as one exits, which could be before rank 0 has printed the message."""


class OwnsTrainSpec(Trainer):
    """A TorchTitan Trainer whose components come from `own_train_spec(registered spec)`."""

    @property
    def train_spec(self) -> TrainSpec:
        return self._own_train_spec

    @train_spec.setter
    def train_spec(self, registered: TrainSpec) -> None:
        self._own_train_spec = self.own_train_spec(registered)

    def own_train_spec(self, registered: TrainSpec) -> TrainSpec:
        """The spec this trainer builds from; by default the registered one."""
        return registered


def save_full_checkpoint(checkpointer: CheckpointManager, step: int) -> bool:
    """A full, resumable checkpoint of `step` now, on disk when this returns; False when nothing
    was saved (checkpointing off, or `checkpoint.load_only`)."""
    if not checkpointer.enable or checkpointer.load_only:
        return False
    interval = checkpointer.interval
    checkpointer.interval = 1
    try:
        checkpointer.save(step)
        checkpointer._async_wait()  # 0.2.2 has no public wait for an async save
    finally:
        checkpointer.interval = interval
    return True


def checkpoint_folder(checkpointer: CheckpointManager, step: int) -> Path:
    """The folder `checkpointer` saves step `step` in (`<folder>/step-<step>` in 0.2.2)."""
    return Path(checkpointer._create_checkpoint_id(step))


def set_command_line(argv: list[str]) -> None:
    """Make `torchtitan.train.main` parse `argv` (see the module docstring)."""
    ConfigManager.parse_args.__defaults__ = (list(argv),)


@dataclass(frozen=True)
class MetricBackends:
    """The loggers of this rank's metrics processor (None: not enabled, or not the logging rank)."""

    tensorboard: TensorBoardLogger | None
    wandb: WandBLogger | None


def metric_backends(container: BaseLogger) -> MetricBackends:
    """The TensorBoard and wandb loggers inside MetricsProcessor.logger."""
    loggers = container._loggers if isinstance(container, LoggerContainer) else []
    tensorboard = next((x for x in loggers if isinstance(x, TensorBoardLogger)), None)
    wandb = next((x for x in loggers if isinstance(x, WandBLogger)), None)
    return MetricBackends(tensorboard, wandb)


def set_wandb_tags(run: Any, tags: list[str]) -> None:
    """Give the wandb run `tags` (see the module docstring)."""
    run.tags = tuple(tags)


def _one_line(error: ConfigError) -> str:
    """The message of `error`; an error re-raised from a dataloader worker process carries the
    worker's traceback in its message, whose last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


@contextmanager
def exit_on_config_error(every_rank: bool = False) -> Iterator[None]:
    """Turn a ConfigError into `error: <message>` on stderr and exit status 2, without a
    traceback. The line is printed by rank 0 (all ranks raise the same checks' errors), or by
    every rank that raises it with `every_rank` (an error only some ranks meet)."""
    try:
        yield
    except ConfigError as e:
        if every_rank or int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(f"error: {_one_line(e)}\n")
            sys.stderr.flush()
        else:
            time.sleep(_RANK0_GRACE_S)  # torchrun ends this rank as soon as rank 0 exits
        raise SystemExit(CONFIG_ERROR_EXIT) from None
