"""Apply TorchTitan's parallelisms to a Trinity model; the model code itself knows none of them."""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import apply_ddp
from torchtitan.models.llama4.infra.parallelize import (
    _op_sac_save_list,
    apply_compile,
    apply_fsdp,
)
from torchtitan.tools.logging import logger

from trinity_titan.compat.cpu import use_sum_reduction_on_gloo
from trinity_titan.model.balance_loss import BalanceLossLayout
from trinity_titan.parallel.context_parallel import apply_compile_around_cp, apply_context_parallel
from trinity_titan.parallel.degrees import replica_groups
from trinity_titan.parallel.moe_tensor_parallel import apply_trinity_moe_ep_tp
from trinity_titan.parallel.tensor_parallel import apply_trinity_tp


def parallelize_trinity(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """TP, expert parallel, context parallel, activation checkpointing, torch.compile, then
    FSDP/HSDP (or DDP), each with TorchTitan's own machinery where it has one. The layout was
    checked before the model was built (trinity_titan.training.checks)."""
    fit_balance_loss(model, job_config, parallel_dims)
    tp_mesh = parallel_dims.get_optional_mesh("tp")
    if tp_mesh is not None:
        # No loss parallelism: Trinity's loss also needs logsumexp (z-loss) and the logit
        # statistics over whole vocabulary rows. With the fused loss the head is left whole.
        apply_trinity_tp(model, tp_mesh, replicate_head=job_config.kernels.fused_loss)
    if parallel_dims.tp_enabled or parallel_dims.ep_enabled:
        apply_trinity_moe_ep_tp(
            model,
            tp_mesh=tp_mesh,
            ep_mesh=parallel_dims.get_optional_mesh("ep"),
            etp_mesh=parallel_dims.get_optional_mesh("etp"),
            ep_etp_mesh=parallel_dims.get_optional_mesh(["ep", "etp"]),
        )
    if parallel_dims.cp_enabled:
        cp_mesh = parallel_dims.get_mesh("cp")
        impl = job_config.parallelism.context_parallel_impl
        apply_context_parallel(
            model,
            cp_mesh.get_group(),
            load_balance=job_config.parallelism.context_parallel_load_balancer == "headtail",
            impl=impl,
        )
        logger.info("Applied Trinity context parallelism (%s) to the model", impl)

    apply_ac_and_compile(model, job_config, parallel_dims.ep_enabled, parallel_dims.cp_enabled)

    if parallel_dims.fsdp_enabled or parallel_dims.ep_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        expert_names = (
            ["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else ["efsdp"]
        )
        dp_mesh = parallel_dims.get_mesh(names)
        apply_fsdp(
            model,
            dp_mesh,
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
            ep_degree=parallel_dims.ep,
            edp_mesh=parallel_dims.get_optional_mesh(expert_names),
            gradient_divide_factor=parallel_dims.fsdp_gradient_divide_factor,
        )
        use_sum_reduction_on_gloo(model, dp_mesh)
        logger.info(
            "Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP"
        )
    elif parallel_dims.dp_replicate_enabled:
        compile_model = job_config.compile.enable and "model" in job_config.compile.components
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=compile_model)
    return model


def global_batch_sequences(job_config: JobConfig, parallel_dims: ParallelDims) -> int:
    """Sequences per optimizer step over the data-parallel ranks of this job (TorchTitan's
    global batch; under torchft, one replica group's share of it)."""
    global_batch = job_config.training.global_batch_size
    if global_batch < 0:  # one micro-batch per rank, in every replica group
        batch_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard
        return job_config.training.local_batch_size * batch_degree
    return global_batch // replica_groups(job_config)


def fit_balance_loss(model: nn.Module, job_config: JobConfig, parallel_dims: ParallelDims) -> None:
    """Lay every MoE layer's balance loss out over the parallel layout (the model knows none).

    - Sequence weight 1 / (sequences in the global batch). Every micro-batch on every rank adds
      alpha * weight * sum of its sequences' losses; gradients are summed over micro-batches and
      ranks, so the objective gets alpha * (mean over the global batch), consistent with
      TorchTitan's cross-entropy (summed, divided by the global token count).
    - torchft: the weight is 1 / (sequences of one replica group), not of all groups, and needs
      no count of the live groups. Within a group gradients are summed as above; across groups
      torchft averages them over the groups in the step's quorum (its AVG divides by the live
      count, and a healing group adds zeros), which is how the cross-entropy, divided by the
      group's own token count, becomes the mean over the live groups' tokens too. So the
      objective is alpha * (mean over the live groups' sequences), however many are alive.
    - Context parallelism: each CP rank holds a part of every sequence. Its top-k hit counts are
      summed over the CP group (a [batch, experts] all-reduce per MoE layer, forward only), and
      each rank adds its share of the loss (see `sequence_balance_loss`).
    - Tensor parallelism: every TP rank computes the whole loss on the same tokens, and the
      router's output gradient is summed over TP (parallel/moe_tensor_parallel.py), so each
      rank back-propagates 1 / tp of it.
    """
    cp_mesh = parallel_dims.get_optional_mesh("cp")
    reduce_hits = None
    if cp_mesh is not None:

        def reduce_hits(hits: torch.Tensor) -> torch.Tensor:
            return funcol.all_reduce(hits, "sum", cp_mesh)

    layout = BalanceLossLayout(
        seq_weight=1.0 / global_batch_sequences(job_config, parallel_dims),
        reduce_hits=reduce_hits,
        grad_scale=1.0 / parallel_dims.tp,
    )
    for block in model.layers.values():
        if block.moe_enabled:
            block.moe.set_balance_loss_layout(layout)


def apply_ac_and_compile(
    model: nn.Module, job_config: JobConfig, ep_enabled: bool = False, cp_enabled: bool = False
) -> None:
    """TorchTitan's activation checkpointing, then torch.compile per block (around the CP op)."""
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=_op_sac_save_list,
            base_folder=job_config.job.dump_folder,
        )
    if compile_model and cp_enabled:
        apply_compile_around_cp(model, job_config.compile.backend)
        logger.info("Compiled each block's modules around the CP attention op")
    elif compile_model:
        apply_compile(model, job_config.compile, ep_enabled)
