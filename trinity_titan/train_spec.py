"""The `trinity` TrainSpec: what TorchTitan's trainer builds for `[model] name = "trinity"`."""

from __future__ import annotations

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.validate import build_validator
from torchtitan.protocols.train_spec import TrainSpec

from trinity_titan.data.loader import build_data_dataloader
from trinity_titan.losses import build_trinity_loss
from trinity_titan.metrics import build_trinity_metrics_processor
from trinity_titan.model import TrinityModel, trinity_flavors
from trinity_titan.model.state_dict_adapter import TrinityStateDictAdapter
from trinity_titan.optimizer import build_trinity_optimizers
from trinity_titan.parallelize import parallelize_trinity
from trinity_titan.tokenizer import build_trinity_tokenizer

TRAIN_SPEC_NAME = "trinity"


def get_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=TrinityModel,
        model_args=trinity_flavors,
        parallelize_fn=parallelize_trinity,
        pipelining_fn=None,
        build_optimizers_fn=build_trinity_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_data_dataloader,
        build_tokenizer_fn=build_trinity_tokenizer,
        build_loss_fn=build_trinity_loss,
        build_metrics_processor_fn=build_trinity_metrics_processor,
        build_validator_fn=build_validator,
        state_dict_adapter=TrinityStateDictAdapter,
    )
