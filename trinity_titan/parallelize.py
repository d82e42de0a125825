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
)
from torchtitan.tools.logging import logger

from trinity_titan.balance_loss import configure_balance_loss
from trinity_titan.context_parallel import apply_compile_around_cp, apply_context_parallel
from trinity_titan.moe_tensor_parallel import apply_trinity_moe_ep_tp
from trinity_titan.parallel_degrees import validate_parallelism
from trinity_titan.tensor_parallel import apply_trinity_tp


def parallelize_trinity(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """TP, expert parallel, context parallel, activation checkpointing, torch.compile, then
    FSDP/HSDP (or DDP), each with TorchTitan's own machinery where it has one."""
    validate_parallelism(
        model.model_args,
        job_config.parallelism,
        job_config.training.seq_len,
        parallel_dims.world_size,
    )

    configure_balance_loss(model, job_config, parallel_dims)
    tp_mesh = parallel_dims.get_optional_mesh("tp")
    if tp_mesh is not None:
        # No loss parallelism: Trinity's loss also needs logsumexp (z-loss) and the logit
        # statistics over whole vocabulary rows. With the fused loss the head is left whole.
        kernels = getattr(job_config, "kernels", None)
        apply_trinity_tp(model, tp_mesh, replicate_head=bool(kernels and kernels.fused_loss))
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
        impl = getattr(job_config.parallelism, "context_parallel_impl", "allgather_halo")
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
        if dist.get_backend(dp_mesh.get_group(dp_mesh.mesh_dim_names[-1])) == "gloo":
            use_sum_reduction(model)
        logger.info(
            "Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP"
        )
    elif parallel_dims.dp_replicate_enabled:
        compile_model = job_config.compile.enable and "model" in job_config.compile.components
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=compile_model)
    return model


def use_sum_reduction(model: nn.Module) -> None:
    """gloo has no PREMUL_SUM; with TorchTitan's divide factor of 1, SUM is the same reduction."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


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
