"""`python -m trinity_titan.tools.plan`: check a parallel layout and its per-rank memory on a CPU.

    python -m trinity_titan.tools.plan --job.config_file train_configs/trinity_large.toml \
        --world-size 2048 --gpu b300 [--parallelism.expert_parallel_degree 8 ...]

Runs the job check (without its file checks), builds the model on the meta device, applies the
real `parallelize_trinity` under a fake process group of `--world-size` ranks (no communication,
no GPU), and prints the batch (gradient accumulation, tokens per optimizer step) and the
parameters, gradients, optimizer state (from `[optimizer] name`: Muon or AdamW) and an activation
estimate of one rank against the GPU's memory, in GiB (2^30 bytes). When the layout does not fit,
it re-plans a list of single changes (and, if none fits alone, pairs) and prints those that fit,
cheapest first.

Exit status: 0 fits, 1 does not fit, 2 invalid configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.train_spec import get_train_spec

import trinity_titan  # noqa: F401  (registers the TrainSpec, CPU device)
from trinity_titan.data.ramp import BatchRamp
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

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Gpu:
    """A GPU by the memory a training process can use: the total that nvidia-smi (and
    torch.cuda.get_device_properties) reports, in MiB. The vendor's figure, in GB, is the
    marketed HBM capacity and is larger."""

    name: str
    usable_mib: int
    vendor_spec: str

    @property
    def gib(self) -> float:
        return self.usable_mib / 1024


GPUS: dict[str, Gpu] = {
    "h100": Gpu("NVIDIA H100 SXM", 81559, "80 GB HBM3"),
    "h200": Gpu("NVIDIA H200", 143771, "141 GB HBM3e"),
    "b200": Gpu("NVIDIA B200", 183359, "180 GB HBM3e usable of 192 GB"),
    "b300": Gpu("NVIDIA B300", 275040, "288 GB HBM3e"),
}
"""Usable HBM as nvidia-smi reports it on each GPU (H100 80 GB: 79.6 GiB, H200: 140.4 GiB,
B200: 179.1 GiB, B300: 268.6 GiB)."""
DEFAULT_GPU = "b300"
TIGHT = 0.9
"""A layout that fits with more than this share of the GPU's memory is flagged as tight."""


@dataclass
class Plan:
    lines: list[str]
    total_bytes: int
    capacity_bytes: int
    params_total: int
    global_batch: int
    """Sequences per optimizer step (at the start of training)."""

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def roomy(self) -> bool:
        """Fits with the margin the estimate leaves out (see TIGHT)."""
        return self.total_bytes <= TIGHT * self.capacity_bytes

    @property
    def share(self) -> str:
        return f"{self.total_bytes / GiB:.2f} GiB of {self.capacity_bytes / GiB:.1f} GiB"


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def _row(label: str, n: int) -> str:
    return f"  {label:<34}{_gib(n)}"


def checkpointed_layers(model: nn.Module, job_config: JobConfig) -> set[int]:
    """The layers whose whole block TorchTitan wrapped for recomputation ('full', or 'selective'
    every n-th layer). Op-level SAC keeps part of each block: counted as no checkpointing, an
    upper bound."""
    ac = job_config.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option == "op":
        return set()
    out = set()
    for layer_id, block in model.layers.items():
        inner = block._orig_mod if isinstance(block, OptimizedModule) else block
        if isinstance(inner, CheckpointWrapper):
            out.add(int(layer_id))
    return out


def _ac_label(job_config: JobConfig, checkpointed: set[int], n_layers: int) -> str:
    ac = job_config.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option == "op":
        return "'selective' op-level (estimated as none: an upper bound)"
    if ac.mode == "selective":
        return (
            f"'selective' every {ac.selective_ac_option} layers ({len(checkpointed)} of {n_layers})"
        )
    return f"'{ac.mode}'"


def make_plan(job_config: JobConfig, world_size: int, gpu: Gpu) -> Plan:
    """Check, parallelise on meta under a fake process group, and account memory per rank."""
    spec = get_train_spec(job_config.model.name)
    checked = check_job(
        job_config, world_size, trinity_trainer=True, files=False, fault_tolerant=True
    )
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
        checkpointed = checkpointed_layers(model, job_config)
    finally:
        if created:
            dist.destroy_process_group()

    t = job_config.training
    dp = degrees.dp_replicate * degrees.dp_shard
    ramp = BatchRamp.from_job_config(job_config, dp)
    accum = ramp.grad_accum_for(ramp.initial, t.local_batch_size, dp)
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
    acts = activation_bytes(args, shape, checkpointed, fused_chunk)
    attn_global = attention_bytes(args, shape, is_local=False)
    attn_local = attention_bytes(args, shape, is_local=True)
    n_global = sum(args.is_global_layer(i) for i in range(args.n_layers))
    attn_all = n_global * sum(attn_global.values()) + (args.n_layers - n_global) * sum(
        attn_local.values()
    )
    total = state.params + state.grads + state.optimizer + buffers + sum(acts.values())
    capacity = gpu.usable_mib * 2**20

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
        f"{t.local_batch_size}; activation checkpointing "
        f"{_ac_label(job_config, checkpointed, args.n_layers)}",
        f"batch: global {ramp.initial} sequences = local {t.local_batch_size} x data-parallel "
        f"{dp} x gradient accumulation {accum}; {ramp.initial * t.seq_len:,} tokens per "
        "optimizer step",
    ]
    for threshold, size in zip(ramp.thresholds, ramp.sizes, strict=True):
        lines.append(
            f"batch ramp: from {threshold:,} tokens global {size} sequences, gradient "
            f"accumulation {ramp.grad_accum_for(size, t.local_batch_size, dp)}; "
            f"{size * t.seq_len:,} tokens per optimizer step"
        )
    lines += [
        f"GPU: {gpu.name}, {gpu.gib:.1f} GiB usable ({gpu.vendor_spec})",
        "per rank:",
        _row(f"parameters ({t.dtype}, {state.params_local / 1e9:.3f}B)", state.params),
        _row(f"gradients ({t.dtype})", state.grads),
        _row("optimizer state", state.optimizer)
        + "  ("
        + ", ".join(
            f"{k}: {v / GiB:.2f} GiB" if k == "adamw" else f"{k} momentum: {v / GiB:.2f} GiB"
            for k, v in sorted(state.details.items(), reverse=True)
        )
        + ")",
        _row("FSDP all-gather/reduce buffers", buffers),
        _row("activations (estimate)", acts["blocks"]),
        _row(
            "loss: logits + grad (fp32)" if fused_chunk is None else "fused loss chunk + head grad",
            acts["logits"],
        ),
        _row("total", total) + f"  of {gpu.gib:.1f} GiB ({100 * total / capacity:.1f}%)",
        f"attention per rank at {t.seq_len} tokens, kept for backward by all layers without "
        f"activation checkpointing: "
        f"{attn_all / GiB:.2f} GiB; one global layer {sum(attn_global.values()) / GiB:.3f} GiB "
        f"(kv {attn_global['kv'] / GiB:.3f}, mask {attn_global['mask'] / GiB:.3f}), "
        f"one local layer {sum(attn_local.values()) / GiB:.3f} GiB "
        f"(kv {attn_local['kv'] / GiB:.3f}, mask {attn_local['mask'] / GiB:.3f})",
    ]
    plan = Plan(lines, total, capacity, state.params_total, ramp.initial)
    if not plan.fits:
        lines.append(f"DOES NOT FIT: {plan.share}")
    elif total > TIGHT * capacity:
        lines.append(
            f"FITS, tightly: over {TIGHT:.0%} of the GPU, and the CUDA context, NCCL buffers "
            "and allocator fragmentation are not in the estimate"
        )
    else:
        lines.append("FITS")
    return plan


# ---------------------------------------------------------------------- changes that would fit
@dataclass(frozen=True)
class Change:
    """Command-line overrides that lower the memory of a layout, and what they cost."""

    overrides: tuple[str, ...]
    cost: str


Family = Callable[[JobConfig, int], list[Change]]
"""The changes of one kind for a job (and its global batch in sequences), mildest first: each
lowers memory more than the one before."""


def _fused_loss(job_config: JobConfig, global_batch: int) -> list[Change]:
    if job_config.kernels.fused_loss:
        return []
    return [Change(("--kernels.fused_loss",), "no extra compute; needs -m trinity_titan.train")]


def _smaller_local_batch(job_config: JobConfig, global_batch: int) -> list[Change]:
    t = job_config.training
    keep = () if t.global_batch_size > 0 else ("--training.global_batch_size", str(global_batch))
    return [
        Change(
            ("--training.local_batch_size", str(b), *keep),
            f"gradient accumulation x{t.local_batch_size // b}, same global batch and math",
        )
        for b in range(t.local_batch_size - 1, 0, -1)
        if t.local_batch_size % b == 0
    ]


def _more_checkpointing(job_config: JobConfig, global_batch: int) -> list[Change]:
    ac = job_config.activation_checkpoint
    changes = []
    if ac.mode == "none" or (ac.mode == "selective" and ac.selective_ac_option == "op"):
        changes.append(
            Change(
                ("--activation_checkpoint.mode", "selective")
                + ("--activation_checkpoint.selective_ac_option", "2"),
                "recomputes every 2nd block in backward (about +1/6 compute)",
            )
        )
    if ac.mode != "full":
        changes.append(
            Change(
                ("--activation_checkpoint.mode", "full"),
                "recomputes every block in backward (about +1/3 compute)",
            )
        )
    return changes


def _more_sharding(job_config: JobConfig, global_batch: int) -> list[Change]:
    p = job_config.parallelism
    replicate, shard = p.data_parallel_replicate_degree, p.data_parallel_shard_degree
    changes, factor = [], 2
    while replicate % factor == 0:
        overrides = ("--parallelism.data_parallel_replicate_degree", str(replicate // factor))
        if shard > 0:  # -1 takes the ranks the replicas free
            overrides += ("--parallelism.data_parallel_shard_degree", str(shard * factor))
        changes.append(
            Change(overrides, f"{factor}x larger FSDP groups (collectives span more ranks)")
        )
        factor *= 2
    return changes


def _more_experts_parallel(job_config: JobConfig, global_batch: int) -> list[Change]:
    ep = job_config.parallelism.expert_parallel_degree
    return [
        Change(
            ("--parallelism.expert_parallel_degree", str(ep * 2**k)),
            f"experts over {ep * 2**k} ranks (all-to-all token exchange)",
        )
        for k in range(1, 4)
    ]


FAMILIES: tuple[Family, ...] = (
    _fused_loss,
    _smaller_local_batch,
    _more_sharding,
    _more_experts_parallel,
    _more_checkpointing,
)
"""Kinds of change, cheapest first: the fused loss costs nothing, a smaller micro-batch keeps the
math, more sharding or expert parallelism add communication, recomputation adds compute."""


@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]
    costs: tuple[str, ...]
    plan: Plan


def suggest_changes(
    argv: list[str], world_size: int, gpu: Gpu, global_batch: int, max_pairs_plans: int = 60
) -> list[Suggestion]:
    """The mildest change of each kind that makes `argv`'s layout fit within TIGHT of the GPU,
    found by re-planning; if no single change does, the mildest pairs (at most
    `max_pairs_plans` re-plans)."""
    base = ConfigManager().parse_args(argv)

    def replan(changes: tuple[Change, ...]) -> Plan | None:
        extra = [arg for c in changes for arg in c.overrides]
        try:
            return make_plan(ConfigManager().parse_args([*argv, *extra]), world_size, gpu)
        except ConfigError:
            return None

    def suggestion(changes: tuple[Change, ...], plan: Plan) -> Suggestion:
        overrides = tuple(arg for c in changes for arg in c.overrides)
        return Suggestion(overrides, tuple(c.cost for c in changes), plan)

    families = [family(base, global_batch) for family in FAMILIES]
    found = []
    for changes in families:
        for change in changes:
            plan = replan((change,))
            if plan is not None and plan.roomy:
                found.append(suggestion((change,), plan))
                break
    if found:
        return found
    budget = max_pairs_plans
    for i, first in enumerate(families):
        for second in families[i + 1 :]:
            for a in first:
                for b in second:
                    if budget == 0:
                        return found
                    budget -= 1
                    plan = replan((a, b))
                    if plan is not None and plan.roomy:
                        found.append(suggestion((a, b), plan))
                        break
                else:
                    continue
                break
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default=DEFAULT_GPU,
        help="the GPU, by its usable memory: "
        + ", ".join(f"{k} {g.gib:.1f} GiB" for k, g in GPUS.items()),
    )
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=None, help="another GPU's usable memory in GiB"
    )
    parser.add_argument(
        "--no-suggestions",
        action="store_true",
        help="when the layout does not fit, do not re-plan changes that would make it fit",
    )
    ours, rest = parser.parse_known_args(argv)
    gpu = GPUS[ours.gpu]
    if ours.gpu_memory_gib is not None:
        gpu = Gpu("GPU", int(ours.gpu_memory_gib * 1024), "--gpu-memory-gib")
    try:
        job_config = ConfigManager().parse_args(rest)
        plan = make_plan(job_config, ours.world_size, gpu)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    print("\n".join(plan.lines))
    if plan.fits or ours.no_suggestions:
        return 0 if plan.fits else 1
    suggestions = suggest_changes(rest, ours.world_size, gpu, plan.global_batch)
    if not suggestions:
        print(f"no single change or pair of changes tried fits within {TIGHT:.0%} of the GPU")
    else:
        print(
            f"changes that fit within {TIGHT:.0%} of the GPU, cheapest kind first (each re-planned):"
        )
        for s in suggestions:
            print(f"  {' '.join(s.overrides)}")
            print(f"      total {s.plan.share}; {'; '.join(s.costs)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
