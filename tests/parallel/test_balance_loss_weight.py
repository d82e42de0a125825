"""The balance loss's sequence weight under torchft: 1 / (one replica group's sequences), with no
count of the live groups, gives alpha x the mean over the live groups' sequences."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.fixtures import debug_job_config
from trinity_titan.model import TrinityModel
from trinity_titan.model.balance_loss import BalanceLossLayout
from trinity_titan.parallel.parallelize import global_batch_sequences

FT = ("--fault_tolerance.enable", "--fault_tolerance.group_size", "4")


@pytest.mark.parametrize(
    "overrides,dp_shard,sequences",
    [
        ((), 2, 16),  # local 8 x dp 2, one micro-batch
        (("--training.global_batch_size", "64"), 2, 64),
        (FT, 2, 16),  # each group: local 8 x its dp 2 (TorchTitan: 1 micro-batch per group)
        ((*FT, "--training.global_batch_size", "64"), 2, 16),  # 64 over 4 groups
    ],
)
def test_sequence_weight_counts_one_replica_groups_batch(overrides, dp_shard, sequences):
    dims = SimpleNamespace(dp_replicate=1, dp_shard=dp_shard)
    assert global_batch_sequences(debug_job_config(*overrides), dims) == sequences


def _router_grad(moe, x: torch.Tensor, seq_weight: float) -> torch.Tensor:
    """The router gradient of the balance loss alone (the MoE output gets no gradient)."""
    moe.set_balance_loss_layout(BalanceLossLayout(seq_weight=seq_weight))
    moe.zero_grad()
    (moe(x) * 0).sum().backward()
    return moe.router.gate.weight.grad.clone()


def test_averaging_the_groups_gives_the_mean_over_live_sequences(debug_args):
    """Two groups of 4 sequences, each weighting a sequence 1 / 4: torchft's average over the
    live groups is the gradient of the mean over all 8 (weight 1 / 8 on one process). With one
    group dead (or healing: it adds zeros and is not counted) the average is the live group's
    own gradient, the mean over its 4: the weight needs no count of the live groups."""
    debug_args.balance_loss_coeff = 0.3
    model = TrinityModel(debug_args)
    model.init_weights()
    moe = model.layers["3"].moe
    moe.expert_bias.copy_(0.05 * torch.randn_like(moe.expert_bias))
    x = torch.randn(8, 6, debug_args.dim)
    group_a, group_b = _router_grad(moe, x[:4], 1 / 4), _router_grad(moe, x[4:], 1 / 4)
    assert group_a.abs().max() > 0
    torch.testing.assert_close((group_a + group_b) / 2, _router_grad(moe, x, 1 / 8))
