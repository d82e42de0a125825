"""Test helper: `-m tests.distributed.bias_dump_trainer` trains like trinity_titan.train, then each rank writes
its expert biases and SMEBU momenta to <dump_folder>/expert_bias_rank<R>.pt."""

from __future__ import annotations

import os

import torch
from torchtitan.train import main

from trinity_titan.train import TrinityTrainer


class BiasDumpTrainer(TrinityTrainer):
    def close(self) -> None:
        if getattr(self, "model_parts", None) and self.step > 0:
            buffers = {
                name.replace("_checkpoint_wrapped_module.", "").replace(
                    "_orig_mod.", ""
                ): t.detach().cpu().clone()
                for name, t in self.model_parts[0].named_buffers()
                if "expert_bias" in name
            }
            rank = int(os.environ.get("RANK", "0"))
            path = os.path.join(self.job_config.job.dump_folder, f"expert_bias_rank{rank}.pt")
            torch.save(buffers, path)
        super().close()


if __name__ == "__main__":
    main(BiasDumpTrainer)
