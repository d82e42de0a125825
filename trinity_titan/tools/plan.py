"""`python -m trinity_titan.tools.plan`: check a parallel layout and its per-rank memory on a CPU.

    python -m trinity_titan.tools.plan --job.config_file train_configs/trinity_large.toml \
        --world-size 2048 [--gpu-memory-gb 288] [--parallelism.expert_parallel_degree 8 ...]

Runs the job check (without its file checks), builds the model on the meta device, applies the
real `parallelize_trinity` under a fake process group of `--world-size` ranks (no communication,
no GPU), and prints the
parameters, gradients, optimizer state (from `[optimizer] name`: Muon or AdamW) and an activation
estimate of one rank against the GPU memory.

Exit status: 0 fits, 1 does not fit, 2 invalid configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.train_spec import get_train_spec

import trinity_titan  # noqa: F401  (registers the TrainSpec, CPU device)
from trinity_titan.job_config import ConfigError
from trinity_titan.tools.memory_estimate import (
    ActivationShape,
    GiB,
    activation_bytes,
    attention_bytes,
    fsdp_buffer_bytes,
    model_state_bytes,
)
from trinity_titan.training.checks import check_job

B300_GB = 288.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    lines: list[str]
    total_bytes: int
    capacity_bytes: int
    params_total: int

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def _gb(n: int) -> str:
    return f"{n / 1e9:8.2f} GB"


def _row(label: str, n: int) -> str:
    return f"  {label:<34}{_gb(n)}"


def make_plan(job_config: JobConfig, world_size: int, gpu_memory_gb: float = B300_GB) -> Plan:
    """Check, parallelise on meta under a fake process group, and account memory per rank."""
    spec = get_train_spec(job_config.model.name)
    checked = check_job(job_config, world_size, trinity_trainer=True, files=False)
    args, degrees = checked.model_args, checked.degrees

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        parallel_dims = ParallelDims(**dataclasses.asdict(degrees))
        parallel_dims.build_mesh()
        with torch.device("meta"):
            model = spec.model_cls(args)
        model = spec.parallelize_fn(model, parallel_dims, job_config)
        compute = DTYPE_BYTES[job_config.training.mixed_precision_param]
        state = model_state_bytes(
            model,
            job_config.optimizer.name,
            param_bytes=DTYPE_BYTES[job_config.training.dtype],
        )
        buffers = fsdp_buffer_bytes(model, compute_bytes=compute)
    finally:
        if created:
            dist.destroy_process_group()

    t = job_config.training
    shape = ActivationShape(
        batch=t.local_batch_size,
        seq_len=t.seq_len,
        cp=degrees.cp,
        tp=degrees.tp,
        ep=degrees.ep,
        compute_bytes=compute,
        cp_impl=job_config.parallelism.context_parallel_impl,
        attn_type=args.attn_type,
        documents=args.attn_mask_type == "block_causal",
    )
    kernels = job_config.kernels
    fused_chunk = kernels.loss_chunk_size if kernels.fused_loss else None
    acts = activation_bytes(args, shape, job_config.activation_checkpoint.mode, fused_chunk)
    attn_global = attention_bytes(args, shape, is_local=False)
    attn_local = attention_bytes(args, shape, is_local=True)
    n_global = sum(args.is_global_layer(i) for i in range(args.n_layers))
    attn_all = n_global * sum(attn_global.values()) + (args.n_layers - n_global) * sum(
        attn_local.values()
    )
    total = state.params + state.grads + state.optimizer + buffers + sum(acts.values())
    capacity = int(gpu_memory_gb * 1e9)

    experts_per_rank = args.num_experts // degrees.ep
    efsdp = degrees.efsdp
    whole = experts_per_rank % efsdp == 0 if efsdp * degrees.ep <= args.num_experts else False
    lines = [
        f"model: {job_config.model.flavor}, {state.params_total / 1e9:.2f}B parameters "
        f"({state.params_total:,}), {args.n_layers} layers, {args.num_experts} experts",
        f"world size {world_size}: dp_replicate {degrees.dp_replicate} x dp_shard "
        f"{degrees.dp_shard} x cp {degrees.cp} x tp {degrees.tp}; ep {degrees.ep} "
        f"(expert FSDP {degrees.efsdp}), etp {degrees.etp}",
        f"routed experts per EP rank: {experts_per_rank}; per rank after expert FSDP: "
        + (
            f"{experts_per_rank // efsdp} whole expert matrices (Muon orthogonalises them locally)"
            if whole
            else "slices of expert matrices (Muon must gather them)"
        ),
        f"optimizer: {job_config.optimizer.name}; sequence {t.seq_len} x local batch "
        f"{t.local_batch_size}; activation checkpointing '{job_config.activation_checkpoint.mode}'",
        "per rank:",
        _row(f"parameters ({t.dtype}, {state.params_local / 1e9:.3f}B)", state.params),
        _row(f"gradients ({t.dtype})", state.grads),
        _row("optimizer state", state.optimizer)
        + "  ("
        + ", ".join(
            f"{k}: {v / 1e9:.2f} GB" if k == "adamw" else f"{k} momentum: {v / 1e9:.2f} GB"
            for k, v in sorted(state.details.items(), reverse=True)
        )
        + ")",
        _row("FSDP all-gather/reduce buffers", buffers),
        _row("activations (estimate)", acts["blocks"]),
        _row(
            "loss: logits + grad (fp32)" if fused_chunk is None else "fused loss chunk + head grad",
            acts["logits"],
        ),
        _row("total", total) + f"  of {gpu_memory_gb:.0f} GB ({100 * total / capacity:.1f}%)",
        f"attention per rank at {t.seq_len} tokens, kept for backward by all layers without "
        f"activation checkpointing: "
        f"{attn_all / GiB:.2f} GiB; one global layer {sum(attn_global.values()) / GiB:.3f} GiB "
        f"(kv {attn_global['kv'] / GiB:.3f}, mask {attn_global['mask'] / GiB:.3f}), "
        f"one local layer {sum(attn_local.values()) / GiB:.3f} GiB "
        f"(kv {attn_local['kv'] / GiB:.3f}, mask {attn_local['mask'] / GiB:.3f})",
    ]
    plan = Plan(lines, total, capacity, state.params_total)
    lines.append("FITS" if plan.fits else "DOES NOT FIT")
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, default=B300_GB)
    ours, rest = parser.parse_known_args(argv)
    try:
        job_config = ConfigManager().parse_args(rest)
        plan = make_plan(job_config, ours.world_size, ours.gpu_memory_gb)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    print("\n".join(plan.lines))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
