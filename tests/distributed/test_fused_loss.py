"""`-m trinity_titan.train --kernels.fused_loss`: the fused head trains exactly like the logits path,
on 1 rank, under 2-rank FSDP (the head sees the all-gathered weight) and under TP 2 (the head is
left whole on every TP rank)."""

from __future__ import annotations

import pytest

from tests.distributed.launch import from_seed, make_seed_checkpoint, run_train

pytestmark = pytest.mark.slow

STEPS = 4
COMMON = ("--training.steps", str(STEPS), "--training.global_batch_size", "16")
# 100-token chunks do not divide the 8 x 128 tokens of a micro-batch: chunk boundaries are crossed.
FUSED = ("--kernels.fused_loss", "--kernels.backend", "torch", "--kernels.loss_chunk_size", "100")


def test_fused_loss_matches_logits_path_on_one_and_two_ranks(tmp_path):
    seed = make_seed_checkpoint(tmp_path / "seed")
    logits, _ = run_train(
        tmp_path / "logits", 1, *COMMON, *from_seed(seed), "--training.local_batch_size", "16"
    )
    # 1 rank, 2 micro-batches of 8 (gradient accumulation over fused loss terms).
    fused1, log1 = run_train(
        tmp_path / "fused1",
        1,
        *COMMON,
        *from_seed(seed),
        *FUSED,
        "--training.local_batch_size",
        "8",
        module="trinity_titan.train",
    )
    fused2, log = run_train(
        tmp_path / "fused2",
        2,
        *COMMON,
        *from_seed(seed),
        *FUSED,
        "--training.local_batch_size",
        "8",
        "--parallelism.data_parallel_shard_degree",
        "2",
        module="trinity_titan.train",
    )
    assert "Applied FSDP to the model" in log
    fused_tp, log_tp = run_train(
        tmp_path / "fused_tp",
        2,
        *COMMON,
        *from_seed(seed),
        *FUSED,
        "--training.local_batch_size",
        "16",
        "--parallelism.data_parallel_shard_degree",
        "1",
        "--parallelism.tensor_parallel_degree",
        "2",
        module="trinity_titan.train",
    )
    assert "Applied tensor parallelism" in log_tp
    for step in logits:
        assert fused_tp[step] == pytest.approx(logits[step], rel=1e-5), (step, logits, fused_tp)
    for run_log in (log1, log, log_tp):
        assert (
            "Fused linear cross-entropy: the LM head computes the loss (torch kernels)" in run_log
        )
    assert sorted(logits) == sorted(fused1) == sorted(fused2) == list(range(1, STEPS + 1))
    for step in logits:
        assert fused1[step] == pytest.approx(logits[step], rel=1e-5), (step, logits, fused1)
        assert fused2[step] == pytest.approx(logits[step], rel=1e-5), (step, logits, fused2)
    assert logits[STEPS] < logits[1]
