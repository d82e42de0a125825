"""Which trainer runs the job: some Trinity features need the hooks of `-m trinity_titan.train`.

`TrinityTrainer` marks itself before TorchTitan builds the tokenizer, dataloader and model, so the
builders can refuse, before any compute, a feature that the stock `-m torchtitan.train` would
silently ignore or fail on later.
"""

from __future__ import annotations

_TRINITY_TRAINER = False


def mark_trinity_trainer() -> None:
    """Called by TrinityTrainer at the start of its __init__."""
    global _TRINITY_TRAINER
    _TRINITY_TRAINER = True


def require_trinity_trainer(feature: str, alternative: str = "") -> None:
    """Raise a RuntimeError naming `feature` and the launch command when the stock trainer runs."""
    if not _TRINITY_TRAINER:
        raise RuntimeError(
            f"{feature} needs Trinity's trainer: launch with `python -m trinity_titan.train` "
            f"(torchrun ... -m trinity_titan.train) instead of `-m torchtitan.train`{alternative}"
        )
