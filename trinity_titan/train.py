"""`python -m trinity_titan.train`: TorchTitan's trainer with Trinity's training-loop additions.

The stock `-m torchtitan.train` trains every Trinity config too; this subclass is where the parts
that need the training loop itself live (they are added by the features that need them).
"""

from __future__ import annotations

from torchtitan.train import Trainer, main


class TrinityTrainer(Trainer):
    """TorchTitan's Trainer; Trinity features override its hooks, never copy its loop."""


if __name__ == "__main__":
    main(TrinityTrainer)
