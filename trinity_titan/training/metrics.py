"""Training-health metrics, logged through TorchTitan's metrics processor (stdout, TensorBoard, wandb).

On every log step, next to TorchTitan's own metrics, to every backend:
  loss/ce, loss/z_loss, loss/batch_het, logits/max, logits/mean, logits/lse_sq_mean (from the loss
  statistics), loss/balance, moe/maxvio_worst, moe/load_frac_min, moe/load_frac_max,
  moe/dead_experts, moe/bias_min, moe/bias_max (from the expert-bias balancer),
  data/skipped_documents (with `[data] on_bad_document = "skip"`: bad documents skipped so far),
  ft/replica_groups (under torchft: the step's participants, the groups its gradients are
  averaged over; a group healing at the first step is one, with zero contributions).
Under torchft every statistic spans the live replica groups (a healing group's is left out), and
so does the logged loss (see compat/torchft.py for why TorchTitan's is replaced).
Per MoE layer, laid out for each backend so that one panel shows every layer:
  - TensorBoard: scalars moe/maxvio/layer_{i} and moe/dead_experts/layer_{i}, drawn together by a
    custom-scalars layout ("MoE by layer"), and a histogram moe/expert_load/layer_{i} of
    n_e / mean(n) over the layer's experts (1: balanced, 0: dead);
  - wandb: per-layer scalars would be one panel per layer (54 on Large), so the history of every
    layer goes into one line-series chart each (moe/maxvio_by_layer, moe/dead_experts_by_layer),
    refreshed every `[wandb] layer_chart_every` log steps, and the load histograms as
    wandb.Histogram (moe/expert_load/layer_{i}: wandb draws each as a heat map over steps).
Trinity's trainer hands the loss statistics and the balancer over (TorchTitan's trainer hands its
metrics processor neither). `[health]` thresholds give one WARNING line per log step that sums up
every crossing, sent as a wandb alert too with `[wandb] alerts`. The run's resolved config (the
flavor's values in place of None, and the model args) goes to wandb's run config and to
TensorBoard as text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from trinity_titan.compat.torchft import ReplicaGroups
from trinity_titan.compat.torchtitan import metric_backends, set_wandb_tags
from trinity_titan.data.skip_count import SkippedDocuments
from trinity_titan.model.args import TrinityModelArgs
from trinity_titan.training.expert_bias import ExpertBiasBalancer, RouterStats
from trinity_titan.training.loss import LossStats

_STDOUT = (
    "loss/ce",
    "loss/z_loss",
    "loss/balance",
    "logits/max",
    "moe/maxvio_worst",
    "data/skipped_documents",
    "ft/replica_groups",
)
"""The health metrics also printed on the console, after TorchTitan's step line."""

_PER_LAYER = ("moe/maxvio/layer_",)
"""Per-layer scalar families kept out of the all-backend metrics (see the module docstring)."""

WANDB_ENV: dict[str, tuple[str, ...]] = {
    "project": ("WANDB_PROJECT",),
    "entity": ("WANDB_TEAM", "WANDB_ENTITY"),
    "run_name": ("WANDB_RUN_NAME", "WANDB_NAME"),
    "group": ("WANDB_RUN_GROUP",),
    "notes": ("WANDB_RUN_NOTES", "WANDB_NOTES"),
}
"""`[wandb]` field -> the environment variables that override it; the first is the one set from
the TOML (TorchTitan's WandBLogger and wandb itself read these). Tags: `wandb_tags`."""

TAG_ENV = ("WANDB_RUN_TAGS", "WANDB_TAGS")
"""Comma-separated tags that override `[wandb] tags`."""


def wandb_settings(job_config: JobConfig) -> dict[str, str]:
    """The run's wandb settings as environment variables: the TOML's, where none is set."""
    w = job_config.wandb
    values = {
        "project": w.project,
        "entity": w.entity,
        "run_name": w.run_name or Path(job_config.job.dump_folder).name,
        "group": w.group,
        "notes": w.notes or job_config.job.description,
    }
    out = {}
    for name, names in WANDB_ENV.items():
        if values[name] and not any(os.environ.get(n) for n in names):
            out[names[0]] = str(values[name])
    return out


def wandb_tags(job_config: JobConfig) -> list[str]:
    """The run's tags: from WANDB_RUN_TAGS or WANDB_TAGS if set, else `[wandb] tags`."""
    for name in TAG_ENV:
        if os.environ.get(name):
            return [t.strip() for t in os.environ[name].split(",") if t.strip()]
    return list(job_config.wandb.tags)


def resolved_config(job_config: JobConfig, model_args: Any) -> dict[str, Any]:
    """The job config with the values the flavor resolved in place of None ([model] attention,
    [moe]), and the model args in full."""
    config = job_config.to_dict()
    if isinstance(model_args, TrinityModelArgs):
        args = dataclasses.asdict(model_args)
        for section in ("model", "moe"):
            for key, value in config.get(section, {}).items():
                if value is None and key in args:
                    config[section][key] = args[key]
        config["model_args"] = args
    return config


class AlertLimiter:
    """At most one alert per `interval_s`; the clock is injectable for tests."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.last: float | None = None

    def ready(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval_s:
            return False
        self.last = now
        return True


class LayerHistory:
    """Per-layer values at each charted log step, thinned to at most `points` steps."""

    def __init__(self, points: int) -> None:
        self.points = points
        self.steps: list[int] = []
        self.values: list[list[float]] = []

    def add(self, step: int, values: list[float]) -> None:
        self.steps.append(step)
        self.values.append(values)
        if len(self.steps) > self.points:
            self.steps, self.values = self.steps[::2], self.values[::2]

    def series(self) -> list[list[float]]:
        """One list per layer, over the kept steps."""
        return [list(v) for v in zip(*self.values, strict=True)]


class TrinityMetricsProcessor(MetricsProcessor):
    """TorchTitan's MetricsProcessor plus Trinity's loss, logit and router statistics."""

    def __init__(
        self,
        job_config: JobConfig,
        parallel_dims: ParallelDims,
        tag: str | None = None,
        loss_stats: LossStats | None = None,
        model_args: Any = None,
        skipped_documents: SkippedDocuments | None = None,
        replica_groups: ReplicaGroups | None = None,
    ) -> None:
        super().__init__(job_config, parallel_dims, tag)
        self.loss_stats = loss_stats
        self.skipped_documents = skipped_documents
        self.replica_groups = replica_groups
        """The live torchft replica groups (None without fault tolerance)."""
        self.balancer: ExpertBiasBalancer | None = None
        self.backends = metric_backends(self.logger)
        self.alerts = AlertLimiter(job_config.wandb.alert_min_interval_s)
        self.layer_history = {
            name: LayerHistory(job_config.wandb.layer_chart_points)
            for name in ("maxvio", "dead_experts")
        }
        self.log_steps = 0
        self._describe_run(resolved_config(job_config, model_args))

    def _describe_run(self, config: dict[str, Any]) -> None:
        """The resolved config to wandb's run config and TensorBoard's text; the per-layer
        layout to TensorBoard."""
        text = json.dumps(config, indent=2, default=str)
        if self.backends.tensorboard is not None:
            writer = self.backends.tensorboard.writer
            writer.add_text("config", f"```\n{text}\n```", 0)
            writer.add_custom_scalars(
                {
                    "MoE by layer": {
                        "MaxVio": ["Multiline", [r"moe/maxvio/layer_\d+"]],
                        "dead experts": ["Multiline", [r"moe/dead_experts/layer_\d+"]],
                    }
                }
            )
        if self.backends.wandb is not None:
            run = self.backends.wandb.wandb.run
            run.config.update(config, allow_val_change=True)
            set_wandb_tags(run, wandb_tags(self.job_config))

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
        loss_metrics, losses = self.loss_summary()
        metrics.update(loss_metrics)
        if self.replica_groups is not None:
            metrics["ft/replica_groups"] = self.replica_groups.participants()
            if losses is not None:  # TorchTitan's are not the live groups' (compat/torchft.py)
                global_avg_loss, global_max_loss = losses
        stats = self.balancer.layer_stats() if self.balancer is not None else None
        if self.balancer is not None:
            metrics.update(self.balancer.metrics())
        if self.skipped_documents is not None:
            metrics["data/skipped_documents"] = self.skipped_total()
        summary = self.check_health(step, metrics)
        common = {k: v for k, v in metrics.items() if not k.startswith(_PER_LAYER)}
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=common)
        if stats is not None:
            self.log_layers(step, stats)
        shown = [(k, metrics[k]) for k in _STDOUT if k in metrics]
        if shown:
            logger.info(f"health {step:2}  " + "  ".join(f"{k}: {v:.4g}" for k, v in shown))
        if summary is not None:
            self.alert(summary)
        self.log_steps += 1

    def log_layers(self, step: int, stats: RouterStats) -> None:
        """Per-layer MaxVio, dead experts and expert-load histograms (module docstring)."""
        maxvio, dead = stats.maxvio.tolist(), stats.dead.tolist()
        load = stats.load
        tb = self.backends.tensorboard
        if tb is not None:
            for i, layer_id in enumerate(stats.layer_ids):
                tb.writer.add_scalar(f"moe/maxvio/layer_{layer_id}", maxvio[i], step)
                tb.writer.add_scalar(f"moe/dead_experts/layer_{layer_id}", dead[i], step)
                tb.writer.add_histogram(f"moe/expert_load/layer_{layer_id}", load[i], step)
        if self.backends.wandb is None:
            return
        wandb = self.backends.wandb.wandb
        self.layer_history["maxvio"].add(step, maxvio)
        self.layer_history["dead_experts"].add(step, [float(d) for d in dead])
        payload: dict[str, Any] = {
            f"moe/expert_load/layer_{layer_id}": wandb.Histogram(load[i].numpy())
            for i, layer_id in enumerate(stats.layer_ids)
        }
        every = self.job_config.wandb.layer_chart_every
        if every > 0 and self.log_steps % every == 0:
            keys = [f"layer {layer_id}" for layer_id in stats.layer_ids]
            for name, title in (("maxvio", "MaxVio by layer"), ("dead_experts", "dead experts")):
                history = self.layer_history[name]
                payload[f"moe/{name}_by_layer"] = wandb.plot.line_series(
                    xs=history.steps, ys=history.series(), keys=keys, title=title, xname="step"
                )
        wandb.log(payload, step=step)

    def loss_metrics(self) -> dict[str, float]:
        return self.loss_summary()[0]

    def loss_summary(self) -> tuple[dict[str, float], tuple[float, float] | None]:
        """The step's loss metrics over every rank (and live replica group), and TorchTitan's
        logged (mean, max) loss recomputed from them: (CE + z-loss) over all valid tokens, and
        the largest per-rank mean. One SUM and one MAX all-reduce."""
        stats = self.loss_stats
        if stats is None or not stats.microbatches:
            return {}, None
        mbs = stats.microbatches
        coef = self.job_config.loss.z_loss_coeff
        ce_sum, z_sum, logit_sum = (
            torch.stack(
                [
                    torch.stack([t.ce_sum.double(), t.z_sum.double(), t.logit_sum.double()])
                    for t in mbs
                ]
            )
            .sum(0)
            .unbind()
        )
        tokens = torch.stack([t.num_valid for t in mbs]).double()
        mb_ce = torch.stack([t.ce_sum.double() for t in mbs]) / tokens.clamp_min(1)
        rank_loss = (ce_sum + coef * z_sum) / tokens.sum().clamp_min(1)
        sums = torch.stack(
            [ce_sum, z_sum, logit_sum, tokens.sum(), mb_ce.sum(), tokens.new_tensor(len(mbs))]
        )
        maxes = torch.stack(
            [torch.stack([t.logit_max.double() for t in mbs]).max(), mb_ce.max(), rank_loss]
        )
        mesh = self.parallel_dims.get_optional_mesh("loss")
        if mesh is not None:
            dist.all_reduce(sums, group=mesh.get_group())
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=mesh.get_group())
        if self.replica_groups is not None:
            self.replica_groups.all_reduce(sums)
            self.replica_groups.all_reduce(maxes, dist.ReduceOp.MAX)
        ce, z, logit_sum, n, mb_ce_sum, mb_count = sums.tolist()
        logit_max, mb_ce_max, loss_max = maxes.tolist()
        n = max(n, 1.0)
        metrics = {
            "loss/ce": ce / n,
            "loss/z_loss": coef * z / n,
            "loss/batch_het": mb_ce_max - mb_ce_sum / max(mb_count, 1.0),
            "logits/max": logit_max,
            "logits/mean": logit_sum / (n * stats.vocab_size),
            "logits/lse_sq_mean": z / n,
        }
        return metrics, ((ce + coef * z) / n, loss_max)

    def skipped_total(self) -> int:
        """Skipped documents over the data-parallel ranks (the ranks of one data-parallel
        group read the same documents)."""
        count = torch.tensor(float(self.skipped_documents.total), dtype=torch.float64)
        mesh = self.parallel_dims.get_optional_mesh("batch")
        if mesh is not None:
            count = count.to(mesh.device_type)
            dist.all_reduce(count, group=mesh.get_group())
        if self.replica_groups is not None:
            self.replica_groups.all_reduce(count)
        return int(count.item())

    def check_health(self, step: int, metrics: dict[str, Any]) -> str | None:
        """One WARNING line that sums up this step's [health] crossings; returns it (or None)."""
        health = self.job_config.health
        parts = []
        max_logit = metrics.get("logits/max")
        if health.max_logit_warn is not None and max_logit is not None:
            if max_logit > health.max_logit_warn:
                parts.append(
                    f"lm_head max logit {max_logit:.4g} > health.max_logit_warn "
                    f"{health.max_logit_warn:g}"
                )
        if health.maxvio_warn is not None:
            prefix = "moe/maxvio/layer_"
            layers = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
            over = {k: v for k, v in layers.items() if v > health.maxvio_warn}
            if over:
                worst = max(over, key=over.get)
                parts.append(
                    f"MaxVio > health.maxvio_warn {health.maxvio_warn:g} in {len(over)} of "
                    f"{len(layers)} MoE layers (worst: layer {worst}, {over[worst]:.4g}; "
                    f"layers {', '.join(over)})"
                )
        if not parts:
            return None
        summary = f"health: step {step}: " + "; ".join(parts)
        logger.warning(summary)
        return summary

    def alert(self, summary: str) -> None:
        """The summary as a wandb alert, when enabled and not sent too recently."""
        if not self.job_config.wandb.alerts or self.backends.wandb is None:
            return
        if self.alerts.ready():
            wandb = self.backends.wandb.wandb
            wandb.alert(
                title="Trinity training health",
                text=summary,
                level=wandb.AlertLevel.WARN,
                wait_duration=self.alerts.interval_s,
            )


def build_trinity_metrics_processor(
    job_config: JobConfig,
    parallel_dims: ParallelDims,
    model_args: Any = None,
    tag: str | None = None,
    loss_stats: LossStats | None = None,
    skipped_documents: SkippedDocuments | None = None,
    replica_groups: ReplicaGroups | None = None,
) -> TrinityMetricsProcessor:
    """The metrics processor of the Trinity TrainSpec. wandb runs offline without an API key, and
    takes its project, name, group, tags and notes from `[wandb]` where no variable sets them."""
    if job_config.metrics.enable_wandb:
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            logger.info("WANDB_API_KEY is not set: wandb runs in offline mode")
            os.environ["WANDB_MODE"] = "offline"
        os.environ.update(wandb_settings(job_config))
    if loss_stats is None:
        logger.info(
            "Trinity's loss, logit and router metrics and [health] warnings are logged by "
            "`-m trinity_titan.train`; TorchTitan's trainer logs its own metrics only"
        )
    return TrinityMetricsProcessor(
        job_config, parallel_dims, tag, loss_stats, model_args, skipped_documents, replica_groups
    )
