"""Trinity's loss metrics and health warnings against direct computations."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torchtitan.tools.logging import logger as titan_logger

from tests.fixtures import debug_job_config
from tests.training.test_loss import V, batch
from trinity_titan.training.checks import check_job
from trinity_titan.training.loss import LossStats, TrinityLoss
from trinity_titan.training.metrics import (
    TAG_ENV,
    WANDB_ENV,
    AlertLimiter,
    LayerHistory,
    TrinityMetricsProcessor,
    resolved_config,
    wandb_settings,
    wandb_tags,
)


def _processor(stats: LossStats, replica_groups=None) -> TrinityMetricsProcessor:
    proc = TrinityMetricsProcessor.__new__(TrinityMetricsProcessor)
    proc.loss_stats = stats
    proc.replica_groups = replica_groups
    proc.parallel_dims = SimpleNamespace(get_optional_mesh=lambda name: None)
    proc.job_config = SimpleNamespace(
        loss=SimpleNamespace(z_loss_coeff=1e-3),
        health=SimpleNamespace(max_logit_warn=1.0, maxvio_warn=0.5),
    )
    return proc


def _step_stats(batches) -> LossStats:
    stats = LossStats(vocab_size=V)
    loss_fn = TrinityLoss(1e-3, stats)
    for logits, labels in batches:
        loss_fn(logits, labels)
    stats.close_step()
    return stats


class _Capture:
    """Replica groups that record what they are given (one group's contribution)."""

    def __init__(self) -> None:
        self.given: list[torch.Tensor] = []

    def all_reduce(self, tensor, op=torch.distributed.ReduceOp.SUM) -> bool:
        self.given.append(tensor.clone())
        return True

    def participants(self) -> int:
        return 1


class _Other:
    """Replica groups holding another group's contributions: SUM adds, MAX takes the larger."""

    def __init__(self, theirs: list[torch.Tensor]) -> None:
        self.theirs = list(theirs)

    def all_reduce(self, tensor, op=torch.distributed.ReduceOp.SUM) -> bool:
        other = self.theirs.pop(0)
        if op == torch.distributed.ReduceOp.MAX:
            torch.maximum(tensor, other, out=tensor)
        else:
            tensor.add_(other)
        return True

    def participants(self) -> int:
        return 2


def test_loss_metrics_span_the_live_replica_groups():
    """Group A's metrics with group B's contributions reduced in equal the metrics of all four
    micro-batches on one process; the logged loss is the mean over both groups' tokens and the
    max is the larger group mean (TorchTitan's FT trainer would log the sum of the means)."""
    torch.manual_seed(3)
    batches = [batch() for _ in range(4)]
    capture = _Capture()
    _processor(_step_stats(batches[2:]), capture).loss_summary()
    metrics, (mean, worst) = _processor(
        _step_stats(batches[:2]), _Other(capture.given)
    ).loss_summary()
    one_process, _ = _processor(_step_stats(batches)).loss_summary()
    for key, value in one_process.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    group_means = [
        _processor(_step_stats(b)).loss_summary()[1][0] for b in (batches[:2], batches[2:])
    ]
    tokens = [sum((lab != -100).sum().item() for _, lab in b) for b in (batches[:2], batches[2:])]
    expected = sum(m * t for m, t in zip(group_means, tokens, strict=True)) / sum(tokens)
    assert mean == pytest.approx(expected, rel=1e-9)
    assert mean == pytest.approx(one_process["loss/ce"] + one_process["loss/z_loss"], rel=1e-9)
    assert worst == pytest.approx(max(group_means), rel=1e-12)


def test_loss_metrics_and_health_warning():
    stats = LossStats(vocab_size=V)
    loss_fn = TrinityLoss(1e-3, stats)
    batches = [batch(), batch()]
    for logits, labels in batches:
        loss_fn(logits, labels)
    stats.close_step()
    proc = _processor(stats)
    m = proc.loss_metrics()
    logits = torch.cat([b[0].detach().flatten(0, 1) for b in batches])
    labels = torch.cat([b[1].flatten() for b in batches])
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")[valid]
    lse = torch.logsumexp(logits, -1)[valid]
    mb_ce = [torch.nn.functional.cross_entropy(b[0].flatten(0, 1), b[1].flatten()) for b in batches]
    assert m["loss/ce"] == pytest.approx(ce.mean().item(), rel=1e-6)
    assert m["loss/z_loss"] == pytest.approx(1e-3 * lse.square().mean().item(), rel=1e-6)
    assert m["logits/max"] == pytest.approx(logits[valid].max().item())
    assert m["logits/mean"] == pytest.approx(logits[valid].mean().item(), rel=1e-5, abs=1e-6)
    het = max(mb_ce).item() - (sum(mb_ce) / 2).item()
    assert m["loss/batch_het"] == pytest.approx(het, rel=1e-5, abs=1e-7)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    titan_logger.addHandler(handler)
    try:
        layers = {"moe/maxvio/layer_2": 0.1, "moe/maxvio/layer_3": 0.9, "moe/maxvio/layer_4": 0.7}
        summary = proc.check_health(7, {**m, **layers})
        assert proc.check_health(8, {"logits/max": 0.5, "moe/maxvio/layer_2": 0.1}) is None
    finally:
        titan_logger.removeHandler(handler)
    text = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert text == [summary]  # one line per log step, whatever the number of layers
    assert summary.startswith("health: step 7: lm_head max logit ")
    assert "> health.max_logit_warn 1" in summary
    assert (
        "MaxVio > health.maxvio_warn 0.5 in 2 of 3 MoE layers (worst: layer 3, 0.9; layers 3, 4)"
        in summary
    )


def test_alerts_are_rate_limited():
    now = [0.0]
    limiter = AlertLimiter(600.0, clock=lambda: now[0])
    sent = []
    for t in (0, 10, 599, 600, 700, 1300):
        now[0] = float(t)
        if limiter.ready():
            sent.append(t)
    assert sent == [0, 600, 1300]


def test_layer_history_keeps_every_layer_and_thins_old_steps():
    history = LayerHistory(points=4)
    for step in range(1, 7):
        history.add(step * 10, [step, -step])
    assert len(history.steps) <= 4 and history.steps[-1] in (50, 60)
    series = history.series()
    assert len(series) == 2 and series[1] == [-v for v in series[0]]
    assert [s // 10 for s in history.steps] == series[0]


def test_wandb_settings_come_from_the_toml_unless_the_environment_sets_them(monkeypatch):
    for names in WANDB_ENV.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    for name in TAG_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = debug_job_config(
        "--wandb.project", "p", "--wandb.group", "g", "--wandb.tags", "a,b",
        "--job.dump_folder", "/x/outputs/my_run",
    )  # fmt: skip
    assert wandb_settings(cfg) == {
        "WANDB_PROJECT": "p",
        "WANDB_RUN_NAME": "my_run",
        "WANDB_RUN_GROUP": "g",
        "WANDB_RUN_NOTES": cfg.job.description,
    }
    assert wandb_tags(cfg) == ["a", "b"]
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_NAME", "env-name")  # wandb's own variable counts too
    monkeypatch.setenv("WANDB_TAGS", "x, y")
    settings = wandb_settings(cfg)
    assert "WANDB_PROJECT" not in settings and "WANDB_RUN_NAME" not in settings
    assert wandb_tags(cfg) == ["x", "y"]


def test_the_resolved_config_has_no_flavor_nulls():
    cfg = debug_job_config()
    assert cfg.moe.balance_gamma is None  # left to the flavor in the TOML
    args = check_job(cfg, 1, trinity_trainer=True, files=False).model_args
    config = resolved_config(cfg, args)
    assert config["moe"]["balance_gamma"] == args.balance_gamma == 1e-3
    assert config["model"]["attn_mask_type"] == "causal"
    assert config["model_args"]["num_experts"] == 8
    assert not [k for k, v in config["moe"].items() if v is None]
