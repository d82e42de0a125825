"""z-loss, cross-entropy statistics and the sequence-wise balance loss against direct computations."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.tools.logging import logger as titan_logger

from trinity_titan.balance_loss import add_aux_loss, sequence_balance_loss
from trinity_titan.losses import LossStats, TrinityLoss, loss_terms_from_logits
from trinity_titan.metrics import TrinityMetricsProcessor
from trinity_titan.model import TrinityModel

V = 11


def _batch(b=2, t=5):
    logits = (3 * torch.randn(b, t, V)).requires_grad_()
    labels = torch.randint(0, V, (b, t))
    labels[0, 1] = labels[1, 4] = -100
    return logits, labels


def test_zero_coefficient_is_torchtitans_cross_entropy():
    logits, labels = _batch()
    loss = TrinityLoss(0.0, LossStats())(logits, labels)
    assert torch.equal(loss, cross_entropy_loss(logits, labels))


def test_z_loss_and_statistics_match_direct_computation():
    coef = 0.05
    logits, labels = _batch()
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
    stats = LossStats()
    loss_fn = TrinityLoss(1e-4, stats)
    for _ in range(3):
        loss_fn(*_batch())
    stats.close_step()  # the optimizer step ends a step of 3 micro-batches
    loss_fn(*_batch())  # the next step has begun: the finished one is still reported
    assert len(stats.microbatches) == 3
    with torch.no_grad():
        loss_fn(*_batch())  # validation: not recorded
    stats.close_step()
    assert len(stats.microbatches) == 1 and stats.vocab_size == V
    precomputed = loss_terms_from_logits(*_batch(), 1e-4)
    assert loss_fn(precomputed, None) is precomputed.loss_sum


def test_loss_metrics_and_health_warning():
    stats = LossStats()
    loss_fn = TrinityLoss(1e-3, stats)
    batches = [_batch(), _batch()]
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


def test_sequence_balance_loss_matches_loop():
    b, t, e, k = 2, 7, 5, 2
    scores = torch.rand(b, t, e)
    selected = torch.topk(scores + 0.1 * torch.randn(e), k, dim=-1).indices
    got = sequence_balance_loss(scores, selected)
    for s in range(b):
        total = 0.0
        for i in range(e):
            hits = sum(int(i in selected[s, tt].tolist()) for tt in range(t))
            f = e / (k * t) * hits
            p = sum((scores[s, tt, i] / scores[s, tt].sum()).item() for tt in range(t)) / t
            total += f * p
        assert got[s].item() == pytest.approx(total, rel=1e-6)


def test_sequence_balance_loss_shares_add_up_over_sequence_shards():
    """Context parallelism: each rank holds some positions of every sequence (head-tail chunks)
    and sums its hit counts with the others'; the shares add up to the whole-sequence loss,
    and so do their gradients."""
    b, t, e, k, ranks = 3, 16, 6, 2, 4
    scores = torch.rand(b, t, e, requires_grad=True)
    selected = torch.topk(scores.detach() + 0.1 * torch.randn(e), k, dim=-1).indices
    whole = sequence_balance_loss(scores, selected)
    (grad_whole,) = torch.autograd.grad(whole.sum(), scores)

    chunks = torch.arange(t).view(2 * ranks, -1)
    shards = [torch.cat((chunks[r], chunks[2 * ranks - 1 - r])) for r in range(ranks)]
    hits_of = [
        torch.zeros(b, e).scatter_add_(
            1, selected[:, pos].reshape(b, -1), torch.ones(b, k * pos.numel())
        )
        for pos in shards
    ]
    total_hits = torch.stack(hits_of).sum(0)
    shares = [
        sequence_balance_loss(scores[:, pos], selected[:, pos], reduce_hits=lambda _h: total_hits)
        for pos in shards
    ]
    torch.testing.assert_close(torch.stack(shares).sum(0), whole)
    (grad_shards,) = torch.autograd.grad(torch.stack(shares).sum(), scores)
    torch.testing.assert_close(grad_shards, grad_whole)


def test_add_aux_loss_scales_the_gradient_only():
    x = torch.randn(3, requires_grad=True)
    aux = torch.tensor(2.0, requires_grad=True)
    y = add_aux_loss(x, aux * 1.0, grad_scale=0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert aux.grad.item() == 0.25 and torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("seq_weight", [None, 1 / 8])
def test_balance_loss_gradient_reaches_router_only(debug_args, seq_weight):
    alpha = 0.3
    debug_args.balance_loss_coeff = alpha
    model = TrinityModel(debug_args)
    model.init_weights()
    moe = model.layers["3"].moe
    moe.balance_loss_seq_weight = seq_weight
    moe.expert_bias.copy_(0.05 * torch.randn_like(moe.expert_bias))
    x = torch.randn(2, 6, debug_args.dim)
    upstream = torch.randn(2, 6, debug_args.dim)

    def grads(coeff):
        moe.balance_loss_coeff = coeff
        moe.zero_grad()
        moe.balance_loss_sum.zero_()
        (moe(x) * upstream).sum().backward()
        return {n: p.grad.clone() for n, p in moe.named_parameters()}

    with_loss, without = grads(alpha), grads(0.0)
    # Direct: alpha * weighted sum over sequences of sum_i f_i P_i, from the router weight.
    w = moe.router.gate.weight.detach().clone().requires_grad_()
    scores = torch.sigmoid(x.view(-1, debug_args.dim) @ w.T).view(2, 6, -1)
    selected = torch.topk(scores.detach() + moe.expert_bias, debug_args.top_k, dim=-1).indices
    e, k, t = scores.shape[-1], debug_args.top_k, 6
    f = torch.zeros(2, e).scatter_add_(1, selected.view(2, -1), torch.ones(2, t * k)) * e / (k * t)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    weight = seq_weight if seq_weight is not None else 1 / 2
    direct = alpha * weight * (f * p).sum()
    direct.backward()

    for name in with_loss:
        diff = with_loss[name] - without[name]
        if name == "router.gate.weight":
            tol = 1e-3 * w.grad.abs().max().item()  # diff of two fp32 gradients: cancellation
            torch.testing.assert_close(diff, w.grad, rtol=1e-3, atol=tol)
            assert w.grad.abs().max() > 0
        else:
            assert diff.abs().max() == 0, name
    # The recorded value is alpha * weight * sum (the training forward with alpha).
    moe.balance_loss_coeff = alpha
    moe.balance_loss_sum.zero_()
    moe(x)
    assert moe.balance_loss_sum.item() == pytest.approx(direct.item(), rel=1e-5)
