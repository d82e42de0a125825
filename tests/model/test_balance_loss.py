"""The sequence-wise balance loss against the report's equation, its shares and its gradient."""

from __future__ import annotations

import pytest
import torch

from trinity_titan.model import TrinityModel
from trinity_titan.model.balance_loss import (
    BalanceLossLayout,
    add_aux_loss,
    sequence_balance_loss,
)


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
    moe.set_balance_loss_layout(BalanceLossLayout(seq_weight=seq_weight))
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
