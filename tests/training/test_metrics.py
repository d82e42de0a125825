"""Trinity's loss metrics and health warnings against direct computations."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torchtitan.tools.logging import logger as titan_logger

from tests.training.test_loss import V, batch
from trinity_titan.training.loss import LossStats, TrinityLoss
from trinity_titan.training.metrics import TrinityMetricsProcessor


def test_loss_metrics_and_health_warning():
    stats = LossStats(vocab_size=V)
    loss_fn = TrinityLoss(1e-3, stats)
    batches = [batch(), batch()]
    for logits, labels in batches:
        loss_fn(logits, labels)
    stats.close_step()
    proc = TrinityMetricsProcessor.__new__(TrinityMetricsProcessor)
    proc.loss_stats = stats
    proc.parallel_dims = SimpleNamespace(get_optional_mesh=lambda name: None)
    proc.job_config = SimpleNamespace(
        loss=SimpleNamespace(z_loss_coeff=1e-3),
        health=SimpleNamespace(max_logit_warn=1.0, maxvio_warn=0.5),
    )
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
        proc.check_health(7, {**m, "moe/maxvio/layer_3": 0.9, "moe/maxvio/layer_2": 0.1})
    finally:
        titan_logger.removeHandler(handler)
    text = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("step 7" in t and "lm_head" in t and "max logit" in t for t in text), text
    assert any("step 7" in t and "layer 3" in t and "0.9" in t for t in text), text
    assert not any("layer 2" in t for t in text)
