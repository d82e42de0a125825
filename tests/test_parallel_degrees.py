"""Layout validation: each bad layout fails before any compute with one message naming the fix."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from torchrun_utils import run_train

from trinity_titan.model import trinity_flavors
from trinity_titan.parallel_degrees import (
    ParallelConfigError,
    resolve_degrees,
    validate_parallelism,
)


def parallelism(**overrides) -> SimpleNamespace:
    values = dict(
        data_parallel_replicate_degree=1,
        data_parallel_shard_degree=-1,
        context_parallel_degree=1,
        tensor_parallel_degree=1,
        pipeline_parallel_degree=1,
        expert_parallel_degree=1,
        expert_tensor_parallel_degree=1,
        context_parallel_load_balancer="headtail",
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def debug(**overrides):
    args = copy.deepcopy(trinity_flavors["debugmodel"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def fails(args, par, seq_len=128, world=8) -> str:
    with pytest.raises(ParallelConfigError) as info:
        validate_parallelism(args, par, seq_len, world)
    return str(info.value)


def test_valid_layouts_resolve():
    d = validate_parallelism(
        debug(), parallelism(data_parallel_replicate_degree=2, expert_parallel_degree=4), 128, 8
    )
    assert (d.dp_replicate, d.dp_shard, d.ep, d.efsdp) == (2, 4, 4, 1)
    large = trinity_flavors["large"]
    d = validate_parallelism(
        large,
        parallelism(
            data_parallel_replicate_degree=16,
            data_parallel_shard_degree=128,
            expert_parallel_degree=8,
        ),
        8192,
        2048,
    )
    assert (d.fsdp, d.efsdp) == (128, 16)


def test_experts_not_divisible_by_ep():
    msg = fails(
        debug(), parallelism(expert_parallel_degree=3, data_parallel_shard_degree=6), world=6
    )
    assert (
        "parallelism.expert_parallel_degree (3) must divide the number of routed experts (8)" in msg
    )
    assert "1, 2, 4, 8" in msg


def test_heads_not_divisible_by_tp():
    msg = fails(debug(n_heads=6, n_kv_heads=2), parallelism(tensor_parallel_degree=4))
    assert "tensor_parallel_degree (4) must divide the model's n_heads (6)" in msg


def test_kv_heads_not_divisible_by_tp():
    msg = fails(debug(), parallelism(tensor_parallel_degree=4))
    assert "tensor_parallel_degree (4) must divide the model's n_kv_heads (2)" in msg


def test_degrees_do_not_multiply_to_world_size():
    msg = fails(debug(), parallelism(data_parallel_shard_degree=2, tensor_parallel_degree=2))
    assert "multiply to 4, not the world size 8" in msg
    assert "--parallelism.data_parallel_shard_degree -1" in msg
    msg = fails(debug(), parallelism(tensor_parallel_degree=3), world=8)
    assert "does not divide" in msg and "world size 8" in msg


def test_sequence_not_divisible_for_cp():
    msg = fails(debug(), parallelism(context_parallel_degree=2), seq_len=102)
    assert "training.seq_len (102) must be divisible by 2 x context_parallel_degree (2)" in msg


def test_cp_refuses_flex_attention():
    assert "attn_type 'sdpa'" in fails(
        debug(attn_type="flex", attn_mask_type="block_causal"),
        parallelism(context_parallel_degree=2),
    )


def test_ep_must_fit_in_the_sharded_ranks():
    msg = fails(debug(), parallelism(data_parallel_replicate_degree=4, expert_parallel_degree=4))
    assert "expert_parallel_degree (4)" in msg and "must divide data_parallel_shard_degree" in msg


def test_resolve_fills_dp_shard():
    assert resolve_degrees(parallelism(tensor_parallel_degree=2), 8).dp_shard == 4


@pytest.mark.slow
def test_torchtitan_train_fails_before_building_the_model(tmp_path):
    _, log = run_train(
        tmp_path,
        2,
        "--parallelism.context_parallel_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "1",
        "--training.seq_len",
        "102",
        check=False,
    )
    assert "training.seq_len (102) must be divisible by 2 x context_parallel_degree (2)" in log
    assert "Building trinity" not in log and "step:" not in log


@pytest.mark.slow
def test_trinity_train_checks_before_the_mesh(tmp_path):
    _, log = run_train(
        tmp_path,
        2,
        "--parallelism.data_parallel_shard_degree",
        "4",
        check=False,
        module="trinity_titan.train",
    )
    assert "the parallel degrees multiply to 4, not the world size 2" in log
    assert "Building device mesh" not in log
