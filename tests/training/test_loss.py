"""Cross-entropy + z-loss and its statistics against direct computations."""

from __future__ import annotations

import pytest
import torch
from torchtitan.components.loss import cross_entropy_loss

from trinity_titan.training.loss import LossStats, TrinityLoss, loss_terms_from_logits

V = 11


def batch(b=2, t=5):
    logits = (3 * torch.randn(b, t, V)).requires_grad_()
    labels = torch.randint(0, V, (b, t))
    labels[0, 1] = labels[1, 4] = -100
    return logits, labels


def test_zero_coefficient_is_torchtitans_cross_entropy():
    logits, labels = batch()
    loss = TrinityLoss(0.0, LossStats(vocab_size=V))(logits, labels)
    assert torch.equal(loss, cross_entropy_loss(logits, labels))


def test_z_loss_and_statistics_match_direct_computation():
    coef = 0.05
    logits, labels = batch()
    terms = loss_terms_from_logits(logits, labels, coef)
    terms.loss_sum.backward()
    got_grad = logits.grad.clone()

    ref_logits = logits.detach().clone().requires_grad_()
    total, ce, z, rows = 0.0, 0.0, 0.0, []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == -100:
                continue
            row = ref_logits[b, t]
            lse = torch.log(torch.exp(row.double()).sum())
            ce_t = lse - row[labels[b, t]].double()
            total = total + ce_t + coef * lse**2
            ce += ce_t.item()
            z += lse.item() ** 2
            rows.append(row.detach())
    total.backward()
    torch.testing.assert_close(terms.loss_sum.double(), total.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert terms.ce_sum.item() == pytest.approx(ce, rel=1e-6)
    assert terms.z_sum.item() == pytest.approx(z, rel=1e-6)
    valid = torch.stack(rows)
    assert terms.logit_max.item() == valid.max().item()
    assert terms.logit_sum.item() == pytest.approx(valid.sum().item(), rel=1e-5, abs=1e-5)
    assert terms.num_valid.item() == 8


def test_loss_fn_records_training_microbatches_per_step():
    stats = LossStats(vocab_size=V)
    loss_fn = TrinityLoss(1e-4, stats)
    for _ in range(3):
        loss_fn(*batch())
    stats.close_step()  # the optimizer step ends a step of 3 micro-batches
    loss_fn(*batch())  # the next step has begun: the finished one is still reported
    assert len(stats.microbatches) == 3
    with torch.no_grad():
        loss_fn(*batch())  # validation: not recorded
    stats.close_step()
    assert len(stats.microbatches) == 1 and stats.vocab_size == V
    precomputed = loss_terms_from_logits(*batch(), 1e-4)
    assert loss_fn(precomputed, None) is precomputed.loss_sum
