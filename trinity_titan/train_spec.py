"""The `trinity` TrainSpec: what TorchTitan's trainer builds for `[model] name = "trinity"`.

These builders serve `-m torchtitan.train`. Trinity's trainer (`-m trinity_titan.train`) builds
from the same spec with some builders bound to its own state (trinity_titan/train.py).
"""

from __future__ import annotations

import copy
import os

import torch.distributed as dist
from torch import nn
from torchtitan.components.ft import FTManager
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.components.validate import build_validator
from torchtitan.config import JobConfig
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.train_spec import TrainSpec

from trinity_titan.compat.torchtitan import exit_on_config_error
from trinity_titan.data.loader import build_data_dataloader
from trinity_titan.model import TrinityModel, trinity_flavors
from trinity_titan.model.state_dict_adapter import TrinityStateDictAdapter
from trinity_titan.optim.builder import build_trinity_optimizers
from trinity_titan.parallel.parallelize import parallelize_trinity
from trinity_titan.training.checks import check_job
from trinity_titan.training.expert_bias import ExpertBiasBalancer
from trinity_titan.training.loss import build_trinity_loss
from trinity_titan.training.metrics import build_trinity_metrics_processor
from trinity_titan.training.run_start import start_run

TRAIN_SPEC_NAME = "trinity"


def build_checked_tokenizer(job_config: JobConfig) -> BaseTokenizer:
    """TorchTitan's trainer calls this first of the builders, after its process group: check the
    job and start the run (output-folder lock, resume choice, data scan), then the tokenizer. A
    ConfigError ends the run with one `error: ...` line and exit status 2."""
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    with exit_on_config_error():
        checked = check_job(job_config, world_size, trinity_trainer=False)
        start_run(job_config, checked.degrees)
    return checked.tokenizer


def build_optimizers_with_expert_bias(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    """Trinity's optimizers, with the expert-bias update before each step."""
    optimizers = build_trinity_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    ExpertBiasBalancer(model_parts, parallel_dims).attach(optimizers)
    return optimizers


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=TrinityModel,
        # TorchTitan's trainer updates its flavor in place: a copy keeps the module's pristine.
        model_args=copy.deepcopy(trinity_flavors),
        parallelize_fn=parallelize_trinity,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers_with_expert_bias,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_data_dataloader,
        build_tokenizer_fn=build_checked_tokenizer,
        build_loss_fn=build_trinity_loss,
        build_metrics_processor_fn=build_trinity_metrics_processor,
        build_validator_fn=build_validator,
        state_dict_adapter=TrinityStateDictAdapter,
    )
