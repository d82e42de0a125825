"""`python -m trinity_titan.train`: TorchTitan's trainer with Trinity's training-loop additions.

The stock `-m torchtitan.train` trains every Trinity config too; this subclass is where the parts
that need the training loop itself live (they are added by the features that need them).
"""

from __future__ import annotations

from typing import Any

import torch
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer, main


class TrinityTrainer(Trainer):
    """TorchTitan's Trainer; Trinity features override its hooks, never copy its loop."""

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """With `[kernels] fused_loss`, hand the labels to the model: its head returns the loss
        terms of the fused linear cross-entropy instead of logits."""
        inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(
            input_dict, labels
        )
        kernels = getattr(self.job_config, "kernels", None)
        if kernels is not None and kernels.fused_loss:
            if self.parallel_dims.pp_enabled:
                raise NotImplementedError(
                    "[kernels] fused_loss does not support pipeline parallelism"
                )
            extra_inputs["labels"] = labels
            if not getattr(self, "_fused_loss_logged", False):
                logger.info(
                    "Fused linear cross-entropy: the LM head computes the loss "
                    f"({self.model_args.kernel_backend} kernels)"
                )
                self._fused_loss_logged = True
        return inputs, labels, extra_inputs, extra_kwargs


if __name__ == "__main__":
    main(TrinityTrainer)
