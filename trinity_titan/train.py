"""`python -m trinity_titan.train`: TorchTitan's trainer with Trinity's training-loop additions.

The stock `-m torchtitan.train` trains every Trinity config too; this subclass adds what needs the
training loop itself: the fused linear cross-entropy (`[kernels] fused_loss`), the batch-size ramp
(`[[data.batch_ramp]]`) and the NaN/inf guard (`[nan_guard]`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer, main

from trinity_titan.context_parallel import SequenceDocuments
from trinity_titan.data.ramp import BatchRamp
from trinity_titan.launcher import mark_trinity_trainer
from trinity_titan.model.attention import TrinityMasks, document_ids
from trinity_titan.nan_guard import NanGuard
from trinity_titan.parallel_degrees import check_job_parallelism


class TrinityTrainer(Trainer):
    """TorchTitan's Trainer; Trinity features override its hooks, never copy its loop."""

    def __init__(self, job_config: JobConfig):
        mark_trinity_trainer()  # before TorchTitan's builders check for it
        super().__init__(job_config)
        dims = self.parallel_dims
        self._batch_degree = dims.get_mesh("batch").size() if dims.dp_enabled else 1
        self.batch_ramp = BatchRamp.from_job_config(job_config, self._batch_degree)
        self.nan_guard = NanGuard(
            job_config.nan_guard, self.model_parts, lambda: self.step, self._checkpoint_now
        )
        kernels = getattr(job_config, "kernels", None)
        if kernels is not None and kernels.fused_loss and self.parallel_dims.pp_enabled:
            raise NotImplementedError("[kernels] fused_loss does not support pipeline parallelism")
        if self.nan_guard.enabled:
            self.loss_fn = self.nan_guard.watch_loss(self.loss_fn)
            self.optimizers.step = self.nan_guard.guard_step(self.optimizers.step)

    def train_step(self, data_iterator):
        """Batch ramp: set gradient accumulation from the global tokens seen before this step."""
        if self.batch_ramp.thresholds:
            tokens = self.ntokens_seen * self._batch_degree  # checkpointed by the Trainer
            accum = self.batch_ramp.grad_accum_at(
                tokens, self.job_config.training.local_batch_size, self._batch_degree
            )
            if accum != self.gradient_accumulation_steps:
                logger.info(
                    f"Batch ramp at {tokens} tokens (step {self.step}): global batch "
                    f"{self.batch_ramp.global_batch_at(tokens)} sequences, "
                    f"gradient accumulation steps {accum}"
                )
                self.gradient_accumulation_steps = accum
        return super().train_step(data_iterator)

    def _checkpoint_now(self, step: int) -> None:
        """A full, resumable checkpoint of `step` now (TorchTitan's last-step save may be weights only)."""
        if not self.checkpointer.enable:
            return
        interval = self.checkpointer.interval
        self.checkpointer.interval = 1
        try:
            self.checkpointer.save(step)
        finally:
            self.checkpointer.interval = interval

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """With `[kernels] fused_loss`, hand the labels to the model: its head returns the loss
        terms of the fused linear cross-entropy instead of logits. With SDPA document masking,
        build the masks TorchTitan builds only for flex: under context parallelism, the document
        ids of the whole sequence, taken before TorchTitan shards the batch."""
        args = self.model_args
        sdpa_documents = args.attn_type == "sdpa" and args.attn_mask_type == "block_causal"
        whole = None
        if sdpa_documents and self.parallel_dims.cp_enabled:
            whole = SequenceDocuments(document_ids(input_dict["input"], self.tokenizer.eos_id))
        inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(
            input_dict, labels
        )
        if sdpa_documents:
            extra_kwargs["attention_masks"] = (
                TrinityMasks(local=whole, global_=whole)
                if whole is not None
                else self.model_parts[0].get_attention_masks(inputs, self.tokenizer)
            )
        kernels = getattr(self.job_config, "kernels", None)
        if kernels is not None and kernels.fused_loss:
            extra_inputs["labels"] = labels
            if not getattr(self, "_fused_loss_logged", False):
                logger.info(
                    "Fused linear cross-entropy: the LM head computes the loss "
                    f"({self.model_args.kernel_backend} kernels)"
                )
                self._fused_loss_logged = True
        return inputs, labels, extra_inputs, extra_kwargs

    def init_distributed(self) -> ParallelDims:
        # Trinity's layout checks (one message naming the option) before any mesh is built.
        check_job_parallelism(self.job_config, int(os.environ["WORLD_SIZE"]))
        return super().init_distributed()


if __name__ == "__main__":
    main(TrinityTrainer)
