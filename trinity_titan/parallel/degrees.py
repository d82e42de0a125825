"""The parallel degrees of a job, resolved against the world size and checked against the model.

`check_layout` is part of the one job check (trinity_titan.training.checks.check_job), which also
serves the planner; each failure is a `ConfigError` naming the option and how to change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trinity_titan.job_config import ConfigError


@dataclass(frozen=True)
class Degrees:
    """Resolved degrees (data_parallel_shard_degree = -1 replaced by its value)."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ep: int
    etp: int
    world_size: int

    @property
    def fsdp(self) -> int:
        """TorchTitan shards parameters over dp_shard x cp."""
        return self.dp_shard * self.cp

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts: the ranks of dp_shard x cp x tp not used by EP."""
        return self.fsdp * self.tp // (self.ep * self.etp)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _product(factors: dict[str, int]) -> str:
    """'name (value) x name (value) ... = product', the arithmetic a degree message shows."""
    terms = " x ".join(f"{name} ({value})" for name, value in factors.items())
    return f"{terms} = {math.prod(factors.values())}"


def resolve_degrees(parallelism: Any, world_size: int) -> Degrees:
    """The degrees of `[parallelism]`; fails if they do not multiply to the world size.

    TorchTitan's world size is dp_replicate x dp_shard x cp x tp x pp; expert parallelism
    (and expert TP) reuse those ranks, so they are not factors of it.
    """
    if world_size < 1:
        raise ConfigError(
            f"the world size is {world_size}; it must be >= 1 (the number of ranks: torchrun's "
            "--nnodes x --nproc_per_node, or the planner's --world-size)"
        )
    p = parallelism
    named = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "expert_parallel_degree": p.expert_parallel_degree,
        "expert_tensor_parallel_degree": p.expert_tensor_parallel_degree,
    }
    for name, value in named.items():
        if value < 1:
            raise ConfigError(f"parallelism.{name} is {value}; it must be >= 1")
    others = {
        name: named[name]
        for name in (
            "data_parallel_replicate_degree",
            "context_parallel_degree",
            "tensor_parallel_degree",
            "pipeline_parallel_degree",
        )
    }
    others_product = math.prod(others.values())
    dp_shard = p.data_parallel_shard_degree
    if dp_shard == -1:
        if world_size % others_product:
            raise ConfigError(
                f"the parallel degrees do not fit the world size {world_size}: "
                f"{_product(others)}, which does not divide {world_size}; choose degrees whose "
                f"product divides {world_size} (data_parallel_shard_degree -1 takes the rest)"
            )
        dp_shard = world_size // others_product
    elif dp_shard < 1:
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree is {dp_shard}; use -1 (the rest) or >= 1"
        )
    elif dp_shard * others_product != world_size:
        factors = {"data_parallel_shard_degree": dp_shard, **others}
        raise ConfigError(
            f"the parallel degrees multiply to {dp_shard * others_product}, not the world size "
            f"{world_size}: {_product(factors)}; set --parallelism.data_parallel_shard_degree -1 "
            f"to use the remaining ranks, or change the degrees so that they multiply to "
            f"{world_size}"
        )
    return Degrees(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=dp_shard,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree,
        etp=p.expert_tensor_parallel_degree,
        world_size=world_size,
    )


def check_layout(model_args: Any, parallelism: Any, seq_len: int, world_size: int) -> Degrees:
    """Resolve and check the degrees for `model_args`; raise ConfigError on the first problem."""
    d = resolve_degrees(parallelism, world_size)
    a = model_args
    if d.pp > 1:
        raise ConfigError(
            f"parallelism.pipeline_parallel_degree is {d.pp}, but Trinity has no pipeline "
            "schedule; set --parallelism.pipeline_parallel_degree 1 and use FSDP/EP instead"
        )
    if d.ep > 1 and a.num_experts % d.ep:
        raise ConfigError(
            f"parallelism.expert_parallel_degree ({d.ep}) must divide the number of routed "
            f"experts ({a.num_experts}); choose one of {_divisors(a.num_experts)}"
        )
    if d.etp not in (1, d.tp):
        raise ConfigError(
            f"parallelism.expert_tensor_parallel_degree ({d.etp}) must be 1 or equal "
            f"tensor_parallel_degree ({d.tp})"
        )
    if d.ep > 1 and (d.fsdp * d.tp) % (d.ep * d.etp):
        raise ConfigError(
            f"parallelism.expert_parallel_degree ({d.ep}) x expert_tensor_parallel_degree "
            f"({d.etp}) must divide data_parallel_shard_degree ({d.dp_shard}) x "
            f"context_parallel_degree ({d.cp}) x tensor_parallel_degree ({d.tp}) = "
            f"{d.fsdp * d.tp}: experts are spread over those ranks; raise "
            "data_parallel_shard_degree or lower expert_parallel_degree"
        )
    if d.tp > 1:
        for name, value in (("n_heads", a.n_heads), ("n_kv_heads", a.n_kv_heads)):
            if value % d.tp:
                raise ConfigError(
                    f"parallelism.tensor_parallel_degree ({d.tp}) must divide the model's "
                    f"{name} ({value}); choose one of {_divisors(value)}"
                )
    if d.cp > 1 and seq_len % (2 * d.cp * d.tp):
        raise ConfigError(
            f"training.seq_len ({seq_len}) must be divisible by 2 x context_parallel_degree "
            f"({d.cp}) x tensor_parallel_degree ({d.tp}) = {2 * d.cp * d.tp}: context "
            "parallelism gives each rank a head and a tail chunk of equal length; change "
            "--training.seq_len or --parallelism.context_parallel_degree"
        )
    if d.tp > 1 and seq_len % d.tp:
        raise ConfigError(
            f"training.seq_len ({seq_len}) must be divisible by tensor_parallel_degree "
            f"({d.tp}) for sequence parallelism; change --training.seq_len"
        )
    if d.cp > 1 and a.attn_type != "sdpa":
        raise ConfigError(
            f"context parallelism needs model.attn_type 'sdpa' (got '{a.attn_type}'): Trinity's "
            "CP attention builds its own causal, sliding-window and document masks from token "
            "positions; set --model.attn_type sdpa"
        )
    balancer = parallelism.context_parallel_load_balancer
    if d.cp > 1 and balancer not in ("headtail", None):
        raise ConfigError(
            f"parallelism.context_parallel_load_balancer '{balancer}' is not supported by "
            "Trinity's CP attention; use 'headtail' (balanced) or None (contiguous chunks)"
        )
    return d


def replica_groups(job_config: Any) -> int:
    """torchft replica groups the data is split over: `[fault_tolerance] group_size` when fault
    tolerance is on, else 1. Each group is its own job with the degrees above; TorchTitan's
    trainer shards the data over (groups x the group's data-parallel degree) and counts the
    global batch over all groups."""
    ft = job_config.fault_tolerance
    return max(1, ft.group_size) if ft.enable else 1
