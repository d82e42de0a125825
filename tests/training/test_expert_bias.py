"""Expert-bias balancing against the report's equations, and the once-per-step hook."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from trinity_titan.model import TrinityModel
from trinity_titan.model.moe import TrinityMoE
from trinity_titan.model.state_dict_adapter import TrinityStateDictAdapter
from trinity_titan.training.expert_bias import (
    BalanceSettings,
    ExpertBiasBalancer,
    apply_bias_update,
    max_violation,
)

E = 6
STEPS = 5


def _synthetic_counts(step: int) -> list[float]:
    g = torch.Generator().manual_seed(100 + step)
    counts = torch.randint(0, 50, (E,), generator=g).tolist()
    counts[step % E] = 20  # sometimes exactly the mean is hit below
    return [float(c) for c in counts]


def _fake_moe() -> SimpleNamespace:
    return SimpleNamespace(expert_bias=torch.zeros(E), expert_bias_momentum=torch.zeros(E))


def _settings(method: str, gamma=1e-3, lam=5e-4, beta=0.5, kappa=2.0) -> BalanceSettings:
    return BalanceSettings(method, gamma, lam, beta, kappa)


def test_aux_free_sign_update_over_steps():
    gamma = 1e-3
    moe, settings = _fake_moe(), _settings("aux_free", gamma=gamma)
    moe.expert_bias += torch.tensor([0.3, -0.1, 0.0, 0.05, 0.0, 0.2])  # nonzero mean to start
    b = moe.expert_bias.tolist()
    for step in range(STEPS):
        n = _synthetic_counts(step)
        nbar = sum(n) / E
        b = [bi + gamma * ((nbar > ni) - (nbar < ni)) for bi, ni in zip(b, n, strict=True)]
        mean_b = sum(b) / E
        b = [bi - mean_b for bi in b]
        apply_bias_update(moe, torch.tensor(n, dtype=torch.float64), settings)
        torch.testing.assert_close(moe.expert_bias, torch.tensor(b), atol=1e-7, rtol=0)
    assert abs(moe.expert_bias.mean().item()) < 1e-7


@pytest.mark.parametrize("lam,beta,kappa", [(5e-4, 0.5, 2.0), (1e-2, 0.9, 1.0)])
def test_smebu_update_over_steps_with_momentum(lam, beta, kappa):
    moe, settings = _fake_moe(), _settings("smebu", lam=lam, beta=beta, kappa=kappa)
    b, m = [0.0] * E, [0.0] * E
    for step in range(STEPS):
        n = _synthetic_counts(step)
        nbar = sum(n) / E
        db = [lam * math.tanh(kappa * (nbar - ni) / nbar) for ni in n]
        mean_db = sum(db) / E
        db = [d - mean_db for d in db]
        m = [beta * mi + (1 - beta) * di for mi, di in zip(m, db, strict=True)]
        b = [bi + mi for bi, mi in zip(b, m, strict=True)]
        apply_bias_update(moe, torch.tensor(n, dtype=torch.float64), settings)
        torch.testing.assert_close(moe.expert_bias_momentum, torch.tensor(m), atol=1e-9, rtol=1e-6)
        torch.testing.assert_close(moe.expert_bias, torch.tensor(b), atol=1e-9, rtol=1e-6)
    assert any(abs(x) > 0 for x in m)


def test_none_leaves_bias_and_maxvio_definition():
    moe = _fake_moe()
    apply_bias_update(moe, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0]), _settings("none"))
    assert torch.count_nonzero(moe.expert_bias) == 0
    # nbar = 4, max = 9 -> (9 - 4) / 4
    assert max_violation(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0])).item() == 1.25
    assert max_violation(torch.zeros(4)).item() == 0.0


class _Optimizers:
    def __init__(self):
        self.hooks = []

    def register_step_pre_hook(self, fn):
        self.hooks.append(fn)

    def step(self):
        for fn in self.hooks:
            fn(self, (), {})


class _NoMesh:
    def get_optional_mesh(self, name):
        return None


def _model(debug_args, **overrides) -> TrinityModel:
    for k, v in overrides.items():
        setattr(debug_args, k, v)
    model = TrinityModel(debug_args)
    model.init_weights()
    return model


def test_hook_counts_every_microbatch_once_per_step(debug_args):
    model = _model(debug_args, balance_method="smebu", smebu_lambda=1e-2)
    opt = _Optimizers()
    balancer = ExpertBiasBalancer([model], _NoMesh()).attach(opt)
    moes = [b.moe for b in model.layers.values() if b.moe_enabled]
    tokens = torch.randint(0, debug_args.vocab_size, (3, 16))
    for micro in tokens.split(1):  # three micro-batches, one step
        model(micro).sum().backward()
    expected = [moe.tokens_per_expert.clone() for moe in moes]
    assert all(e.sum().item() == 3 * 16 * debug_args.top_k for e in expected)
    assert balancer.metrics() == {}  # no finished step yet
    opt.step()
    torch.testing.assert_close(balancer.last_counts.float(), torch.stack(expected))
    assert balancer.metrics()["moe/maxvio_worst"] > 0
    for moe in moes:
        assert moe.tokens_per_expert.sum().item() == 0
        assert moe.expert_bias.abs().sum().item() > 0
        assert moe.expert_bias_momentum.abs().sum().item() > 0


def test_no_counting_under_no_grad_or_activation_recompute(debug_args):
    model = _model(debug_args, balance_loss_coeff=1e-2)
    moe: TrinityMoE = model.layers["3"].moe
    x = torch.randn(2, 16, debug_args.dim, requires_grad=True)
    with torch.no_grad():
        moe(x)
    assert moe.tokens_per_expert.sum().item() == 0 and moe.balance_loss_sum.item() == 0

    moe(x).sum().backward()
    plain_counts, plain_bal = moe.tokens_per_expert.clone(), moe.balance_loss_sum.clone()
    plain_grad = moe.router.gate.weight.grad.clone()
    moe.tokens_per_expert.zero_(), moe.balance_loss_sum.zero_(), moe.zero_grad()

    # Non-reentrant checkpointing re-runs the forward inside backward: nothing is counted twice.
    checkpoint(moe, x, use_reentrant=False).sum().backward()
    assert plain_counts.sum().item() == 2 * 16 * debug_args.top_k
    torch.testing.assert_close(moe.tokens_per_expert, plain_counts)
    torch.testing.assert_close(moe.balance_loss_sum, plain_bal)
    torch.testing.assert_close(moe.router.gate.weight.grad, plain_grad)


def test_momentum_is_checkpointed_but_not_in_hf(debug_args):
    model = _model(debug_args, balance_method="smebu")
    sd = model.state_dict()
    assert "layers.3.moe.expert_bias_momentum" in sd and "layers.3.moe.tokens_per_expert" not in sd
    adapter = TrinityStateDictAdapter(debug_args, None)
    hf = adapter.to_hf(sd)
    assert not any("momentum" in k for k in hf)
    back = adapter.from_hf(hf)
    assert set(back) == set(sd)
    assert torch.count_nonzero(back["layers.3.moe.expert_bias_momentum"]) == 0


class _OtherGroups:
    """ReplicaGroups as the balancer sees it: the other live groups' stacked counts are added."""

    def __init__(self, theirs: torch.Tensor | None, participants: int) -> None:
        self.theirs = theirs
        self.live = participants

    def all_reduce(self, tensor, op=None) -> bool:
        if self.theirs is not None:
            tensor.add_(self.theirs)
        return True

    def participants(self) -> int:
        return self.live


def _routed_step(model, tokens) -> None:
    model(tokens).sum().backward()


def test_counts_are_summed_across_replica_groups_so_biases_agree(debug_args):
    """Two replica groups see different tokens. Each sums the other's counts into its own
    (under torchft, through the manager): both then apply the update of the summed counts,
    and their biases and SMEBU momenta stay equal (a group counting alone would drift)."""
    debug_args.balance_loss_coeff = 1e-2
    a = _model(debug_args, balance_method="smebu", smebu_lambda=1e-2)
    b = copy.deepcopy(a)
    alone = copy.deepcopy(a)
    tokens = torch.randint(0, debug_args.vocab_size, (2, 4, 16))
    for model, x in ((a, tokens[0]), (b, tokens[1]), (alone, tokens[0])):
        _routed_step(model, x)
    mine_a = ExpertBiasBalancer([a], _NoMesh()).gather()
    mine_b = ExpertBiasBalancer([b], _NoMesh()).gather()
    both_a = ExpertBiasBalancer([a], _NoMesh(), _OtherGroups(mine_b.clone(), 2))
    both_b = ExpertBiasBalancer([b], _NoMesh(), _OtherGroups(mine_a.clone(), 2))
    summed_a, summed_b = both_a.gather(), both_b.gather()
    torch.testing.assert_close(summed_a, summed_b)
    torch.testing.assert_close(summed_a[:, :-1], mine_a[:, :-1] + mine_b[:, :-1])
    # the balance-loss column is each group's mean: their sum over the live groups / 2
    torch.testing.assert_close(summed_a[:, -1], (mine_a[:, -1] + mine_b[:, -1]) / 2)
    both_a.apply(summed_a)
    both_b.apply(summed_b)
    ExpertBiasBalancer([alone], _NoMesh()).update()
    for name, buf in a.named_buffers():
        if "expert_bias" in name:
            assert torch.equal(buf, b.get_buffer(name)), name
            assert buf.abs().max() > 0
            assert not torch.equal(buf, alone.get_buffer(name)), name  # alone: another update


def test_a_healing_group_adds_zero_counts(debug_args):
    """torchft zeroes a healing group's contribution: the live group's counts are the sum."""
    model = _model(debug_args, balance_method="aux_free")
    _routed_step(model, torch.randint(0, debug_args.vocab_size, (2, 16)))
    expected = ExpertBiasBalancer([model], _NoMesh()).gather()
    got = ExpertBiasBalancer([model], _NoMesh(), _OtherGroups(torch.zeros_like(expected), 1))
    torch.testing.assert_close(got.gather(), expected)
