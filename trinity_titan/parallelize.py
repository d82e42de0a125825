"""Apply TorchTitan's parallelisms to a Trinity model; the model code itself knows none of them."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import apply_ddp
from torchtitan.models.llama4.infra.parallelize import (
    _op_sac_save_list,
    apply_compile,
    apply_fsdp,
    apply_moe_ep_tp,
)
from torchtitan.tools.logging import logger

from trinity_titan.balance_loss import set_balance_loss_weight


def parallelize_trinity(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """Expert parallel, activation checkpointing, torch.compile, then FSDP/HSDP (or DDP)."""
    if parallel_dims.tp_enabled or parallel_dims.cp_enabled:
        raise NotImplementedError(
            "Trinity does not support tensor or context parallelism yet; "
            "set --parallelism.tensor_parallel_degree 1 --parallelism.context_parallel_degree 1"
        )
    if job_config.training.seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(
            f"training.seq_len ({job_config.training.seq_len}) must be divisible by "
            f"{parallel_dims.seq_len_divisor} (TP degree x 2 x CP degree)"
        )

    set_balance_loss_weight(model, job_config, parallel_dims)
    if parallel_dims.ep_enabled:
        apply_moe_ep_tp(
            model,
            tp_mesh=None,
            ep_mesh=parallel_dims.get_mesh("ep"),
            etp_mesh=None,
            ep_etp_mesh=None,
        )

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=_op_sac_save_list,
            base_folder=job_config.job.dump_folder,
        )
    if compile_model:
        apply_compile(model, job_config.compile, parallel_dims.ep_enabled)

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
        if dist.get_backend(dp_mesh.get_group(dp_mesh.mesh_dim_names[-1])) == "gloo":
            use_sum_reduction(model)
        logger.info(
            "Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP"
        )
    elif parallel_dims.dp_replicate_enabled:
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=compile_model)
    return model


def use_sum_reduction(model: nn.Module) -> None:
    """gloo has no PREMUL_SUM; with TorchTitan's divide factor of 1, SUM is the same reduction."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
