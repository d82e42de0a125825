"""Test helper: `-m tests.distributed.state_dump_trainer` trains like trinity_titan.train and, at
the start of step `STATE_DUMP_STEP` (env), writes the whole training state as full tensors to
<dump_folder>/state_before_step<N>.pt (rank 0): the model (expert biases and SMEBU momenta
included) and the optimizer state (Muon momentum, AdamW moments). On a resumed run that step is
the first after the load, so two runs on different layouts compare what the checkpoint gave them."""

from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torchtitan.train import main

from trinity_titan.train import TrinityTrainer


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class StateDumpTrainer(TrinityTrainer):
    def train_step(self, data_iterator):
        if self.step == int(os.environ["STATE_DUMP_STEP"]):
            self._dump()
        super().train_step(data_iterator)

    def _dump(self) -> None:
        options = StateDictOptions(full_state_dict=True)
        model = get_model_state_dict(self.model_parts[0], options=options)
        optimizer = {k: _full(v) for k, v in sorted(self.optimizers.state_dict().items())}
        state = {
            "model": {_clean(k): v.detach().cpu().clone() for k, v in model.items()},
            "optimizer": {
                _clean(k): v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                for k, v in optimizer.items()
            },
        }
        if torch.distributed.get_rank() == 0:
            path = os.path.join(self.job_config.job.dump_folder, f"state_before_step{self.step}.pt")
            torch.save(state, path)


if __name__ == "__main__":
    main(StateDumpTrainer)
