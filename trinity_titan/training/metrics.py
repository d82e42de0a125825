"""Training-health metrics, logged through TorchTitan's metrics processor (stdout, TensorBoard, wandb).

On every log step, next to TorchTitan's own metrics:
  loss/ce, loss/z_loss, loss/batch_het, logits/max, logits/mean, logits/lse_sq_mean (from the loss
  statistics), loss/balance, moe/maxvio/layer_{i}, moe/maxvio_worst, moe/load_frac_min,
  moe/load_frac_max, moe/dead_experts, moe/bias_min, moe/bias_max (from the expert-bias balancer),
  data/skipped_documents (with `[data] on_bad_document = "skip"`: bad documents skipped so far).
Trinity's trainer hands these sources over (TorchTitan's trainer hands its metrics processor neither
the loss nor anything that owns router statistics). `[health]` thresholds turn a crossing into a
WARNING.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from trinity_titan.data.skip_count import SkippedDocuments
from trinity_titan.training.expert_bias import ExpertBiasBalancer
from trinity_titan.training.loss import LossStats

_STDOUT = (
    "loss/ce",
    "loss/z_loss",
    "loss/balance",
    "logits/max",
    "moe/maxvio_worst",
    "data/skipped_documents",
)
"""The health metrics also printed on the console, after TorchTitan's step line."""


class TrinityMetricsProcessor(MetricsProcessor):
    """TorchTitan's MetricsProcessor plus Trinity's loss, logit and router statistics."""

    def __init__(
        self,
        job_config: JobConfig,
        parallel_dims: ParallelDims,
        tag: str | None = None,
        loss_stats: LossStats | None = None,
        skipped_documents: SkippedDocuments | None = None,
    ) -> None:
        super().__init__(job_config, parallel_dims, tag)
        self.loss_stats = loss_stats
        self.skipped_documents = skipped_documents
        self.balancer: ExpertBiasBalancer | None = None

    def watch_experts(self, balancer: ExpertBiasBalancer) -> None:
        """Report the router statistics `balancer` keeps (it is built after this processor)."""
        self.balancer = balancer

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ):
        metrics = dict(extra_metrics or {})
        metrics.update(self.loss_metrics())
        if self.balancer is not None:
            metrics.update(self.balancer.metrics())
        if self.skipped_documents is not None:
            metrics["data/skipped_documents"] = self.skipped_total()
        self.check_health(step, metrics)
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=metrics)
        shown = [(k, metrics[k]) for k in _STDOUT if k in metrics]
        if shown:
            logger.info(f"health {step:2}  " + "  ".join(f"{k}: {v:.4g}" for k, v in shown))

    def loss_metrics(self) -> dict[str, float]:
        stats = self.loss_stats
        if stats is None or not stats.microbatches:
            return {}
        mbs = stats.microbatches
        sums = torch.stack(
            [torch.stack([t.ce_sum.double(), t.z_sum.double(), t.logit_sum.double()]) for t in mbs]
        ).sum(0)
        tokens = torch.stack([t.num_valid for t in mbs]).double()
        mb_ce = torch.stack([t.ce_sum.double() for t in mbs]) / tokens.clamp_min(1)
        sums = torch.cat([sums, tokens.sum()[None]])
        logit_max = torch.stack([t.logit_max.double() for t in mbs]).max()
        mesh = self.parallel_dims.get_optional_mesh("loss")
        if mesh is not None:
            group = mesh.get_group()
            dist.all_reduce(sums, group=group)
            dist.all_reduce(logit_max, op=dist.ReduceOp.MAX, group=group)
            gathered = [torch.empty_like(mb_ce) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, mb_ce, group=group)
            mb_ce = torch.cat(gathered)
        ce, z, logit_sum, n = sums.tolist()
        n = max(n, 1.0)
        return {
            "loss/ce": ce / n,
            "loss/z_loss": self.job_config.loss.z_loss_coeff * z / n,
            "loss/batch_het": (mb_ce.max() - mb_ce.mean()).item(),
            "logits/max": logit_max.item(),
            "logits/mean": logit_sum / (n * stats.vocab_size),
            "logits/lse_sq_mean": z / n,
        }

    def skipped_total(self) -> int:
        """Skipped documents over the data-parallel ranks (the ranks of one data-parallel
        group read the same documents)."""
        count = torch.tensor(float(self.skipped_documents.total), dtype=torch.float64)
        mesh = self.parallel_dims.get_optional_mesh("batch")
        if mesh is not None:
            count = count.to(mesh.device_type)
            dist.all_reduce(count, group=mesh.get_group())
        return int(count.item())

    def check_health(self, step: int, metrics: dict[str, Any]) -> None:
        health = self.job_config.health
        max_logit = metrics.get("logits/max")
        if health.max_logit_warn is not None and max_logit is not None:
            if max_logit > health.max_logit_warn:
                logger.warning(
                    f"health: step {step}, layer lm_head: max logit {max_logit:.4g} "
                    f"> health.max_logit_warn {health.max_logit_warn:g}"
                )
        if health.maxvio_warn is not None:
            prefix = "moe/maxvio/layer_"
            for name, value in metrics.items():
                if name.startswith(prefix) and value > health.maxvio_warn:
                    logger.warning(
                        f"health: step {step}, MoE layer {name[len(prefix) :]}: MaxVio "
                        f"{value:.4g} > health.maxvio_warn {health.maxvio_warn:g}"
                    )


def build_trinity_metrics_processor(
    job_config: JobConfig,
    parallel_dims: ParallelDims,
    model_args: Any = None,
    tag: str | None = None,
    loss_stats: LossStats | None = None,
    skipped_documents: SkippedDocuments | None = None,
) -> TrinityMetricsProcessor:
    """The metrics processor of the Trinity TrainSpec; wandb runs offline without an API key."""
    if job_config.metrics.enable_wandb and not os.environ.get("WANDB_API_KEY"):
        if not os.environ.get("WANDB_MODE"):
            logger.info("WANDB_API_KEY is not set: wandb runs in offline mode")
            os.environ["WANDB_MODE"] = "offline"
    if loss_stats is None:
        logger.info(
            "Trinity's loss, logit and router metrics and [health] warnings are logged by "
            "`-m trinity_titan.train`; TorchTitan's trainer logs its own metrics only"
        )
    return TrinityMetricsProcessor(job_config, parallel_dims, tag, loss_stats, skipped_documents)
