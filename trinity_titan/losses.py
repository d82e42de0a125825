"""Training losses. Called by TorchTitan's trainer as loss_fn(pred, labels) with sum reduction."""

from __future__ import annotations

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.config import JobConfig


def build_trinity_loss(job_config: JobConfig, **kwargs):
    return build_cross_entropy_loss(job_config, **kwargs)
