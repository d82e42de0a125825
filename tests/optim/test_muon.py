"""Muon on one device: against a plain reference written here, parameter groups, state, schedules."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import FTOptimizersContainer
from torchtitan.config import ConfigManager

import trinity_titan  # noqa: F401  (registers the train spec)
from trinity_titan.model import TrinityModel
from trinity_titan.optim.builder import (
    MuonOptimizersContainer,
    build_trinity_optimizers,
    muon_defaults,
)
from trinity_titan.optim.muon import HybridMuon
from trinity_titan.optim.orthogonalise import newton_schulz
from trinity_titan.train_spec import build_optimizers_with_expert_bias

KJ = (3.4445, -4.7750, 2.0315)


def config(**overrides) -> SimpleNamespace:
    """`[optimizer]` as TorchTitan merges it with trinity_titan.job_config.Optimizer."""
    values = dict(
        name="Muon", lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
        muon_lr=0.02, muon_weight_decay=0.05, muon_momentum=0.95, muon_nesterov=True,
        muon_adjust_lr="original", ns_steps=5, ns_coefficients=list(KJ), ns_eps=1e-7,
        ns_dtype="float32", early_step_in_backward=False,
    )  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def model(debug_args) -> TrinityModel:
    model = TrinityModel(debug_args)
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


def fake_grads(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


# ---------------------------------------------------------------- a plain reference


def ref_orthogonalise(g: torch.Tensor, steps: int, coeffs) -> torch.Tensor:
    """Keller Jordan's quintic iteration on one matrix, written out with mm."""
    a, b, c = coeffs
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = torch.mm(x, x.T)
        x = a * x + torch.mm(b * s + c * torch.mm(s, s), x)
    return x.T if g.shape[0] > g.shape[1] else x


def ref_step(params, state, groups, cfg) -> None:
    """One optimizer step: Muon per matrix (experts one by one) and torch's AdamW elsewhere."""
    for kind, plist in groups.items():
        for p in plist:
            g = p.grad
            if kind == "muon":
                buf = state.setdefault(p, torch.zeros_like(p))
                buf.mul_(cfg.muon_momentum).add_((1 - cfg.muon_momentum) * g)
                u = (1 - cfg.muon_momentum) * g + cfg.muon_momentum * buf
                if not cfg.muon_nesterov:
                    u = buf
                mats = [u] if u.ndim == 2 else list(u)
                ortho = [ref_orthogonalise(m, cfg.ns_steps, cfg.ns_coefficients) for m in mats]
                o = ortho[0] if u.ndim == 2 else torch.stack(ortho)
                out, inp = p.shape[-2:]
                if cfg.muon_adjust_lr == "original":
                    lr = cfg.muon_lr * max(1.0, out / inp) ** 0.5
                else:
                    lr = cfg.muon_lr * 0.2 * max(out, inp) ** 0.5
                p.data = p.data * (1 - cfg.muon_lr * cfg.muon_weight_decay) - lr * o
    adamw = [
        {"params": groups["adamw"], "weight_decay": cfg.weight_decay},
        {"params": groups["adamw_no_decay"], "weight_decay": 0.0},
    ]
    if "adamw_opt" not in state:
        state["adamw_opt"] = torch.optim.AdamW(
            adamw, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
        )
    state["adamw_opt"].step()


def expected_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """The issue's assignment, written by name: hidden matrices Muon, embedding/head/1-D AdamW."""
    groups = {"muon": [], "adamw": [], "adamw_no_decay": []}
    hidden = ("attention.w", "feed_forward.w", "shared_experts.w", "moe.experts.w", "router.gate")
    for name, p in model.named_parameters():
        if name in ("tok_embeddings.weight", "output.weight"):
            groups["adamw"].append(p)
        elif name.endswith("norm.weight"):
            groups["adamw_no_decay"].append(p)
        elif any(h in name for h in hidden):
            groups["muon"].append(p)
        else:
            raise AssertionError(f"unexpected parameter {name}")
    return groups


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "overrides", [{}, {"muon_nesterov": False, "muon_adjust_lr": "match_rms_adamw", "ns_steps": 3}]
)
def test_two_steps_match_reference(model, overrides):
    cfg = config(**overrides)
    ref_model = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    ours = MuonOptimizersContainer([model], cfg)
    ref_state: dict = {}
    for seed in (1, 2):
        fake_grads(model, seed)
        fake_grads(ref_model, seed)
        ours.step()
        ref_step(ref_model.parameters(), ref_state, expected_groups(ref_model), cfg)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.equal(p, initial[name]), name


def test_experts_are_a_batch_of_matrices_never_flattened():
    experts = torch.randn(4, 6, 10, dtype=torch.float64)
    batched = newton_schulz(experts, KJ, 5, 1e-7, torch.float64)
    looped = torch.stack([ref_orthogonalise(e, 5, KJ) for e in experts])
    torch.testing.assert_close(batched, looped)
    flattened = ref_orthogonalise(experts.reshape(24, 10), 5, KJ).reshape(4, 6, 10)
    assert (batched - flattened).abs().max() > 0.1
    # Tall matrices are orthogonalised through their transpose: rows stay the short side.
    tall = newton_schulz(experts.mT, KJ, 5, 1e-7, torch.float64)
    torch.testing.assert_close(tall, batched.mT)
    # Quintic NS with these coefficients leaves singular values in about [0.7, 1.2], bf16 too.
    for dtype in ("float32", "bfloat16"):
        sv = torch.linalg.svdvals(newton_schulz(experts.float(), KJ, 5, 1e-7, dtype).float())
        assert 0.5 < sv.min() and sv.max() < 1.5, (dtype, sv)


def test_every_parameter_in_exactly_one_right_group(model):
    cfg = config()
    (opt,) = MuonOptimizersContainer([model], cfg).optimizers
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    want = expected_groups(model)
    muon, adamw, no_decay = opt.param_groups
    assert [id(p) for p in muon["params"]] == [id(p) for p in want["muon"]]
    assert [id(p) for p in adamw["params"]] == [id(p) for p in want["adamw"]]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in want["adamw_no_decay"]]
    assert (muon["use_muon"], adamw["use_muon"], no_decay["use_muon"]) == (True, False, False)
    assert (muon["lr"], adamw["lr"], no_decay["lr"]) == (cfg.muon_lr, cfg.lr, cfg.lr)
    wds = muon["weight_decay"], adamw["weight_decay"], no_decay["weight_decay"]
    assert wds == (cfg.muon_weight_decay, cfg.weight_decay, 0.0)
    assert any(p.ndim == 3 for p in muon["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(want["adamw"]) == 2


def test_norms_get_no_weight_decay(model):
    """With zero gradients only weight decay moves a weight: norms must not move."""
    opt = MuonOptimizersContainer([model], config(weight_decay=0.5, muon_weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (p.ndim > 1), name


def test_state_dict_round_trip_is_exact(model):
    cfg = config()
    twin = copy.deepcopy(model)
    opt = MuonOptimizersContainer([model], cfg)
    for seed in (1, 2):
        fake_grads(model, seed)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert any(k.endswith("momentum_buffer") for k in saved)
    assert any(k.endswith("exp_avg_sq") for k in saved)

    twin.load_state_dict(model.state_dict())
    restored = MuonOptimizersContainer([twin], cfg)
    restored.load_state_dict(copy.deepcopy(saved))
    again = restored.state_dict()
    assert set(again) == set(saved)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again[key], value), key
        else:
            assert again[key] == value, key

    fake_grads(model, 3)
    fake_grads(twin, 3)
    opt.step()
    restored.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("decay, min_factor", [("linear", 0.0), ("cosine", 0.1)])
def test_both_groups_follow_the_schedule(model, decay, min_factor):
    cfg = config()
    opt = MuonOptimizersContainer([model], cfg)
    sched_cfg = SimpleNamespace(
        warmup_steps=3, total_steps=None, decay_ratio=None, decay_type=decay,
        min_lr_factor=min_factor,
    )  # fmt: skip
    schedulers = build_lr_schedulers(opt, sched_cfg, training_steps=10)
    (inner,) = opt.optimizers
    for step in range(1, 11):
        if step <= 3:
            factor = step / 3  # linear warmup over 3 steps
        else:  # TorchTitan holds the peak one step, then decays over the remaining 7
            progress = (step - 4) / 7
            shape = 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
            factor = min_factor + (1 - min_factor) * shape
        lrs = [g["lr"] for g in inner.param_groups]
        assert lrs == pytest.approx([cfg.muon_lr * factor, cfg.lr * factor, cfg.lr * factor])
        opt.step()
        schedulers.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(cfg.muon_lr * min_factor)


def test_rejects_tensors_muon_cannot_orthogonalise():
    with pytest.raises(ValueError, match="2-D or 3-D"):
        HybridMuon(
            [{"params": [torch.nn.Parameter(torch.ones(3))], "use_muon": True}],
            **muon_defaults(config()),
        )


@pytest.mark.parametrize(
    "flavor, muon_lr, adamw_lr, decay, min_factor",
    [
        ("nano", 1e-3, 3e-4, "linear", 0.0),
        ("mini", 1e-3, 2e-4, "linear", 0.0),
        ("large", 8e-4, 2e-4, "cosine", 0.1),
    ],
)
def test_flavor_configs_use_the_reports_muon_recipe(flavor, muon_lr, adamw_lr, decay, min_factor):
    path = Path(__file__).resolve().parents[2] / "train_configs" / f"trinity_{flavor}.toml"
    cfg = ConfigManager().parse_args(["--job.config_file", str(path)])
    opt, sched = cfg.optimizer, cfg.lr_scheduler
    assert (opt.name, opt.muon_lr, opt.lr) == ("Muon", muon_lr, adamw_lr)
    assert (sched.warmup_steps, sched.decay_type, sched.min_lr_factor) == (2000, decay, min_factor)


def test_debug_config_selects_muon_from_the_command_line(model):
    path = Path(__file__).resolve().parents[2] / "train_configs" / "trinity_debug.toml"
    args = ["--optimizer.name", "Muon", "--optimizer.ns_coefficients", "3", "-4", "2"]
    cfg = ConfigManager().parse_args(["--job.config_file", str(path), *args])
    assert list(cfg.optimizer.ns_coefficients) == [3.0, -4.0, 2.0]
    container = build_trinity_optimizers([model], cfg.optimizer, SimpleNamespace())
    assert isinstance(container, MuonOptimizersContainer)
    assert container.optimizers[0].param_groups[0]["ns_coefficients"] == (3.0, -4.0, 2.0)
    cfg = ConfigManager().parse_args(["--job.config_file", str(path)])
    assert not isinstance(build_trinity_optimizers([model], cfg.optimizer, SimpleNamespace()),
                          MuonOptimizersContainer)  # fmt: skip


def test_expert_bias_update_still_runs_with_muon(model):
    parallel_dims = SimpleNamespace(get_optional_mesh=lambda name: None)
    optimizers = build_optimizers_with_expert_bias([model], config(), parallel_dims)
    moes = [b.moe for b in model.layers.values() if b.moe_enabled]
    for moe in moes:
        moe.tokens_per_expert.copy_(torch.arange(moe.tokens_per_expert.numel()))
    fake_grads(model, 1)
    optimizers.step()
    for moe in moes:
        assert moe.expert_bias.abs().sum() > 0 and moe.tokens_per_expert.sum() == 0


class _VotingManager:
    """torchft's Manager as TorchTitan's FT container uses it: a quorum and a commit vote."""

    def __init__(self, commit: bool) -> None:
        self.commit = commit
        self.votes = 0

    def start_quorum(self) -> None:
        pass

    def should_commit(self) -> bool:
        self.votes += 1
        return self.commit


@pytest.mark.parametrize("commit", [True, False])
def test_under_torchft_muon_takes_torchtitans_ft_optimizer_path(model, commit):
    """With an enabled FTManager, Muon + AdamW is one HybridMuon per model part inside
    TorchTitan's FTOptimizersContainer: a step updates only when torchft commits it, and the
    Muon matrices then get exactly the plain container's update."""
    manager = _VotingManager(commit)
    ft = SimpleNamespace(enabled=True, manager=manager, use_async_quorum=True)
    twin = copy.deepcopy(model)
    opt = build_trinity_optimizers([model], config(), None, ft)
    assert isinstance(opt, FTOptimizersContainer) and isinstance(opt.optimizers[0], HybridMuon)
    plain = build_trinity_optimizers([twin], config(), None)
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    fake_grads(model, 1)
    fake_grads(twin, 1)
    opt.step()
    plain.step()
    assert manager.votes == 1
    muon = {id(p) for g in opt.optimizers[0].param_groups if g["use_muon"] for p in g["params"]}
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if not commit:
            assert torch.equal(p, before[name]), name
        elif id(p) in muon:
            assert torch.equal(p, q) and not torch.equal(p, before[name]), name
