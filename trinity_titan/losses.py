"""Training losses. Called by TorchTitan's trainer as loss_fn(pred, labels) with sum reduction."""

from __future__ import annotations

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.config import JobConfig


def build_trinity_loss(job_config: JobConfig, **kwargs):
    cross_entropy = build_cross_entropy_loss(job_config, **kwargs)

    def loss_fn(pred, labels):
        # The fused head (`[kernels] fused_loss`) already returns the summed loss terms.
        if hasattr(pred, "loss_sum"):
            return pred.loss_sum
        return cross_entropy(pred, labels)

    return loss_fn
