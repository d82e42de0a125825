"""Every parallel layout trains like one rank: first 5 losses of `torchrun -m torchtitan.train`
(CPU, gloo, fp32) from the same seed checkpoint and the same global batches.

The debug model's sequence (128) is four sliding windows (32) long, so context parallelism
exercises both the key/value all-gather (global layer) and the halo exchange (local layers).
The sequence-wise balance loss is checked the same way on the layouts that split (CP) or repeat
(TP) its sequences, and document masking under CP.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.distributed.launch import from_seed, make_seed_checkpoint, run_train

pytestmark = pytest.mark.slow

STEPS = 5
GLOBAL_BATCH = 4
COMMON = (
    "--training.steps",
    str(STEPS),
    "--training.global_batch_size",
    str(GLOBAL_BATCH),
    "--lr_scheduler.warmup_steps",
    "2",
)


def _degrees(rep=1, shard=1, tp=1, ep=1, cp=1) -> tuple[str, ...]:
    return (
        "--parallelism.data_parallel_replicate_degree",
        str(rep),
        "--parallelism.data_parallel_shard_degree",
        str(shard),
        "--parallelism.tensor_parallel_degree",
        str(tp),
        "--parallelism.expert_parallel_degree",
        str(ep),
        "--parallelism.context_parallel_degree",
        str(cp),
    )


AC = ("--activation_checkpoint.mode", "full")
COMPILE = ("--compile.enable", "--compile.backend", "aot_eager")

# name: (ranks, data-parallel degree, degrees and options, a line the log must contain).
# Some layouts also turn on activation checkpointing and torch.compile (aot_eager: no C++
# toolchain needed), which must not change the losses either.
LAYOUTS = {
    "fsdp2": (2, 2, _degrees(shard=2), "Applied FSDP"),
    "hsdp2x2": (4, 4, _degrees(rep=2, shard=2), "Applied HSDP"),
    "ep2": (2, 2, _degrees(shard=2, ep=2), "Applied FSDP"),
    "tp2": (2, 1, _degrees(tp=2) + COMPILE, "Compiling each TransformerBlock"),
    "fsdp2_ep2": (4, 4, _degrees(shard=4, ep=2), "Applied FSDP"),
    "hsdp2x2_ep2": (4, 4, _degrees(rep=2, shard=2, ep=2), "Applied HSDP"),
    "fsdp2_tp2_ep2": (4, 2, _degrees(shard=2, tp=2, ep=2) + AC, "Applied tensor parallelism"),
    "fsdp2_tp2_ep2_etp2": (
        4,
        2,
        _degrees(shard=2, tp=2, ep=2) + ("--parallelism.expert_tensor_parallel_degree", "2"),
        "Applied tensor parallelism",
    ),
    "cp2": (2, 1, _degrees(cp=2) + AC + COMPILE, "modules around the CP attention op"),
    "tp2_cp2_ep2": (4, 1, _degrees(tp=2, cp=2, ep=2), "Trinity context parallelism"),
    "fsdp2_cp2": (4, 2, _degrees(shard=2, cp=2), "Trinity context parallelism (allgather_halo)"),
    "hsdp2x1_cp2": (4, 2, _degrees(rep=2, shard=1, cp=2), "Applied HSDP"),
}


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    return make_seed_checkpoint(tmp_path_factory.mktemp("seed"))


def _one_rank(
    tmp_path_factory, seed, *extra: str, module: str = "torchtitan.train"
) -> tuple[dict[int, float], str]:
    losses, log = run_train(
        tmp_path_factory.mktemp("one"),
        1,
        *COMMON,
        *from_seed(seed),
        *extra,
        "--training.local_batch_size",
        str(GLOBAL_BATCH),
        "--parallelism.data_parallel_shard_degree",
        "1",
        module=module,
    )
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses, log


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, seed):
    return _one_rank(tmp_path_factory, seed)[0]


FLEX = ("--model.attn_type", "flex")
# FlexAttention has no CPU backward: these run only where there is a GPU per rank.
FLEX_LAYOUTS = {
    "flex_fsdp2": (2, 2, _degrees(shard=2) + FLEX, "Applied FSDP"),
    "flex_tp2": (2, 1, _degrees(tp=2) + FLEX, "Applied tensor parallelism"),
    "flex_fsdp2_ep2": (2, 2, _degrees(shard=2, ep=2) + FLEX, "Applied FSDP"),
}
GPUS = torch.cuda.device_count()


@pytest.mark.parametrize(
    "layout",
    list(LAYOUTS)
    + [
        pytest.param(
            name,
            marks=[pytest.mark.cuda, pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")],
        )
        for name in FLEX_LAYOUTS
    ],
)
def test_layout_matches_one_rank(tmp_path, seed, baseline, layout):
    losses, _ = _run_layout(tmp_path, seed, baseline, *{**LAYOUTS, **FLEX_LAYOUTS}[layout])
    assert losses[STEPS] < losses[1]


# Routed experts through torch._grouped_mm (the CPU default is the per-expert loop): on one rank
# it trains like the loop, and the expert-parallel layouts (whose all-to-all dispatch pads the
# token groups) match that 1-rank run.
GROUPED = ("--moe.use_grouped_mm", "True")
GROUPED_LOG = "Trinity routed experts: torch._grouped_mm"
GROUPED_LAYOUTS = {name: LAYOUTS[name] for name in ("ep2", "fsdp2_ep2")}


@pytest.fixture(scope="module")
def grouped_baseline(tmp_path_factory, seed):
    losses, log = _one_rank(tmp_path_factory, seed, *GROUPED)
    assert GROUPED_LOG in log
    return losses


def test_grouped_experts_one_rank_trains_like_the_loop(grouped_baseline, baseline):
    assert grouped_baseline[STEPS] < grouped_baseline[1] - 0.3, grouped_baseline
    for step in baseline:
        assert grouped_baseline[step] == pytest.approx(baseline[step], rel=2e-5), step


@pytest.mark.parametrize("layout", list(GROUPED_LAYOUTS))
def test_grouped_experts_layout_matches_one_rank(tmp_path, seed, grouped_baseline, layout):
    _, log = _run_layout(tmp_path, seed, grouped_baseline, *GROUPED_LAYOUTS[layout], *GROUPED)
    assert GROUPED_LOG in log


def _run_layout(
    tmp_path, seed, baseline, nproc, dp, degrees, marker, *extra, module="torchtitan.train"
):
    """Train `degrees` on `nproc` ranks; the losses must equal the 1-rank `baseline`'s."""
    losses, log = run_train(
        tmp_path,
        nproc,
        *COMMON,
        *from_seed(seed),
        *extra,
        *degrees,
        "--training.local_batch_size",
        str(GLOBAL_BATCH // dp),
        module=module,
    )
    assert marker in log
    assert sorted(losses) == list(range(1, STEPS + 1)), log[-3000:]
    for step in baseline:
        assert losses[step] == pytest.approx(baseline[step], rel=2e-5), (step, baseline, losses)
    return losses, log


# The sequence-wise balance loss where its sequences are split over ranks (CP: hit counts summed
# over the CP group, each rank adds its share) or repeated on ranks (TP: each adds 1 / tp of the
# router gradient). A large alpha, so that a wrong share or scale moves the losses (by ~1e-3).
BALANCE = ("--moe.balance_loss_coeff", "0.05")
TRAINER = "trinity_titan.train"  # logs Trinity's metrics (loss/balance)
BALANCE_LAYOUTS = {
    "cp2_balance": (2, 1, _degrees(cp=2) + AC + COMPILE, "Trinity context parallelism"),
    "tp2_cp2_ep2_balance": (4, 1, _degrees(tp=2, cp=2, ep=2), "Applied tensor parallelism"),
}
_BALANCE_METRIC = re.compile(r"health\s+(\d+)\s.*loss/balance: ([0-9.eE+-]+)")


def _balance_values(log: str) -> dict[int, float]:
    return {int(step): float(value) for step, value in _BALANCE_METRIC.findall(log)}


@pytest.fixture(scope="module")
def balance_baseline(tmp_path_factory, seed):
    return _one_rank(tmp_path_factory, seed, *BALANCE, module=TRAINER)


@pytest.mark.parametrize("layout", list(BALANCE_LAYOUTS))
def test_balance_loss_layout_matches_one_rank(tmp_path, seed, balance_baseline, layout):
    one_losses, one_log = balance_baseline
    _, log = _run_layout(
        tmp_path, seed, one_losses, *BALANCE_LAYOUTS[layout], *BALANCE, module=TRAINER
    )
    # the logged balance loss (4 significant digits) is the whole-batch value on every layout
    one_balance = _balance_values(one_log)
    assert sorted(one_balance) == list(range(1, STEPS + 1)) and one_balance[1] > 0
    assert _balance_values(log) == one_balance


# Document masking under CP: every rank gets the document ids of the whole sequence and masks its
# chunks with them. With SDPA the masks are built by Trinity's trainer.
DOCUMENTS = ("--model.attn_mask_type", "block_causal")


@pytest.fixture(scope="module")
def documents_baseline(tmp_path_factory, seed):
    return _one_rank(tmp_path_factory, seed, *DOCUMENTS, module=TRAINER)[0]


def test_document_masking_under_cp_matches_one_rank(tmp_path, seed, baseline, documents_baseline):
    cp2 = (2, 1, _degrees(cp=2) + AC + COMPILE, "Trinity context parallelism")
    _run_layout(tmp_path, seed, documents_baseline, *cp2, *DOCUMENTS, module=TRAINER)
    # the debug rows pack several documents, so the masking changes the loss
    assert documents_baseline[1] != pytest.approx(baseline[1], rel=1e-4)
