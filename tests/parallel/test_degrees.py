"""Layout validation: each bad layout fails before any compute with one message naming the fix."""

from __future__ import annotations

import copy
import math
import re
from types import SimpleNamespace

import pytest

from trinity_titan.job_config import ConfigError
from trinity_titan.model import trinity_flavors
from trinity_titan.parallel.degrees import check_layout, resolve_degrees


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
    with pytest.raises(ConfigError) as info:
        check_layout(args, par, seq_len, world)
    return str(info.value)


def test_valid_layouts_resolve():
    d = check_layout(
        debug(), parallelism(data_parallel_replicate_degree=2, expert_parallel_degree=4), 128, 8
    )
    assert (d.dp_replicate, d.dp_shard, d.ep, d.efsdp) == (2, 4, 4, 1)
    large = trinity_flavors["large"]
    d = check_layout(
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


def _arithmetic_holds(msg: str) -> bool:
    """'a (x) x b (y) ... = n' in `msg`: the factors shown multiply to the product shown."""
    factors, product = re.search(r": ((?:\w+ \(\d+\)(?: x )?)+) = (\d+)", msg).groups()
    values = [int(v) for v in re.findall(r"\((\d+)\)", factors)]
    return math.prod(values) == int(product)


def test_degrees_do_not_multiply_to_world_size():
    msg = fails(debug(), parallelism(data_parallel_shard_degree=2, tensor_parallel_degree=2))
    assert "multiply to 4, not the world size 8" in msg
    # every factor of the product is shown, data_parallel_shard_degree included
    assert (
        "data_parallel_shard_degree (2) x data_parallel_replicate_degree (1) x "
        "context_parallel_degree (1) x tensor_parallel_degree (2) x pipeline_parallel_degree (1)"
        " = 4;" in msg
    )
    assert _arithmetic_holds(msg)
    assert "--parallelism.data_parallel_shard_degree -1" in msg
    msg = fails(debug(), parallelism(tensor_parallel_degree=3), world=8)
    assert "does not divide" in msg and "world size 8" in msg
    assert "tensor_parallel_degree (3) x pipeline_parallel_degree (1) = 3, which" in msg
    assert _arithmetic_holds(msg)


@pytest.mark.parametrize("world", [0, -8])
def test_world_size_below_one(world):
    msg = fails(debug(), parallelism(), world=world)
    assert f"the world size is {world}; it must be >= 1" in msg


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
