"""`python -m trinity_titan.train`: TorchTitan's trainer with Trinity's training-loop additions.

The stock `-m torchtitan.train` trains every Trinity config too; this subclass adds what needs the
training loop itself: the config check before the process group, the start of the run right after
it (output-folder lock, resume choice, data scan), the fused linear cross-entropy
(`[kernels] fused_loss`), the batch-size ramp (`[[data.batch_ramp]]`), SDPA document masks, the
NaN/inf guard (`[nan_guard]`) and Trinity's metrics. It owns the per-step state (loss statistics,
the expert-bias balancer, the guard, the skipped-document count) and hands it to the components
that use it. A ConfigError ends the run with one `error: ...` line and exit status 2.
`python -m trinity_titan.train_ft` runs this trainer as one torchft replica group.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.train_spec import TrainSpec
from torchtitan.tools.logging import logger
from torchtitan.train import main

from trinity_titan.compat.torchft import OptimizerStepPhases, ReplicaGroups
from trinity_titan.compat.torchtitan import (
    OwnsTrainSpec,
    checkpoint_folder,
    exit_on_config_error,
    save_full_checkpoint,
    set_command_line,
)
from trinity_titan.data.loader import build_data_dataloader
from trinity_titan.data.ramp import BatchRamp
from trinity_titan.data.skip_count import SkippedDocuments
from trinity_titan.job_config import CONFIG_MODULE
from trinity_titan.model.attention import TrinityMasks, document_ids
from trinity_titan.model.hf_export import write_hf_metadata
from trinity_titan.model.lm_head import FusedLoss
from trinity_titan.optim.builder import build_trinity_optimizers
from trinity_titan.parallel.context_parallel import SequenceDocuments
from trinity_titan.training.checks import CheckedJob, check_job
from trinity_titan.training.expert_bias import ExpertBiasBalancer
from trinity_titan.training.loss import LossStats, build_trinity_loss
from trinity_titan.training.metrics import build_trinity_metrics_processor
from trinity_titan.training.nan_guard import BadStep, NanGuard, drop_gradients
from trinity_titan.training.row_trace import RowTrace
from trinity_titan.training.run_start import RunStart, start_run


@dataclass(frozen=True)
class StepClosing:
    """What the ranks (and replica groups) agreed on before an optimizer step."""

    bad: BadStep | None
    """Not None: the step was not finite and is skipped."""
    counts: torch.Tensor | None
    """The step's global expert counts (see ExpertBiasBalancer.gather); None when skipped."""


class TrinityTrainer(OwnsTrainSpec):
    """TorchTitan's Trainer; Trinity features override its hooks, never copy its loop."""

    fault_tolerant: ClassVar[bool] = False
    """Whether this trainer runs `[fault_tolerance]` (trinity_titan.train_ft)."""

    checked: CheckedJob
    """The job as checked before the mesh: model args, degrees and tokenizer."""
    run_start: RunStart
    """The output-folder lock, the resume step and the data scan."""
    loss_stats: LossStats
    balancer: ExpertBiasBalancer
    skipped_documents: SkippedDocuments | None
    """Bad documents skipped (with `[data] on_bad_document = "skip"`), for the metrics."""
    row_trace: RowTrace | None
    """Where the trained rows' document pieces go (`[data] trace_rows`)."""
    replica_groups: ReplicaGroups | None
    """The live torchft replica groups (None without fault tolerance)."""
    step_phases: OptimizerStepPhases[StepClosing]
    """Runs the step's closing around the optimizer step (and torchft's commit vote)."""

    def __init__(self, job_config: JobConfig):
        self._stop_after_step: BadStep | None = None
        self._global_tokens_base = (0, 0)
        """(global tokens, this rank's ntokens_seen) at the loaded checkpoint."""
        super().__init__(job_config)
        self.metrics_processor.watch_experts(self.balancer)
        self._batch_degree = self.data_parallel_degree()
        self.batch_ramp = BatchRamp.from_job_config(job_config, self._batch_degree)
        self.nan_guard = NanGuard(
            job_config.nan_guard,
            self.model_parts,
            self.loss_stats,
            lambda: self.step,
            self.replica_groups,
        )
        if self.nan_guard.enabled:
            self.loss_fn = self.nan_guard.watch_loss(self.loss_fn)
        kernels, loss = job_config.kernels, job_config.loss
        self.fused_loss = (
            FusedLoss(loss.z_loss_coeff, kernels.loss_chunk_size, kernels.fused_logit_stats)
            if kernels.fused_loss
            else None
        )
        if self.fused_loss is not None:
            logger.info(
                "Fused linear cross-entropy: the LM head computes the loss "
                f"({self.model_args.kernel_backend} kernels)"
            )

    # ------------------------------------------------------------------ construction
    def init_distributed(self) -> ParallelDims:
        # The one config check, before any mesh, tokenizer, data or model is built.
        with exit_on_config_error():
            self.checked = check_job(
                self.job_config,
                int(os.environ["WORLD_SIZE"]),
                trinity_trainer=True,
                fault_tolerant=self.fault_tolerant,
            )
        self.loss_stats = LossStats(self.checked.model_args.vocab_size)
        data = self.job_config.data
        skips = bool(data.sources) and data.on_bad_document == "skip"
        self.skipped_documents = SkippedDocuments() if skips else None
        traced = bool(data.sources) and data.trace_rows
        rank = int(os.environ.get("RANK", "0"))
        self.row_trace = RowTrace(self.job_config.job.dump_folder, rank) if traced else None
        dims = super().init_distributed()
        with exit_on_config_error():
            self.run_start = start_run(self.job_config, self.checked.degrees)
        return dims

    def data_parallel_degree(self) -> int:
        """Data-parallel ranks the global batch is split over (TorchTitan's batch degree)."""
        dims = self.parallel_dims
        return dims.get_mesh("batch").size() if dims.dp_enabled else 1

    def live_replica_groups(self) -> ReplicaGroups | None:
        """The torchft replica groups Trinity's sums span (none without fault tolerance)."""
        return None

    def own_train_spec(self, registered: TrainSpec) -> TrainSpec:
        """The registered spec with builders that use this trainer's checked job and state."""
        self.replica_groups = self.live_replica_groups()
        return dataclasses.replace(
            registered,
            model_args={self.job_config.model.flavor: self.checked.model_args},
            build_tokenizer_fn=lambda job_config: self.checked.tokenizer,
            build_dataloader_fn=functools.partial(
                build_data_dataloader, report_skipped=True, trace_rows=True
            ),
            build_loss_fn=functools.partial(build_trinity_loss, stats=self.loss_stats),
            build_metrics_processor_fn=functools.partial(
                build_trinity_metrics_processor,
                loss_stats=self.loss_stats,
                skipped_documents=self.skipped_documents,
                replica_groups=self.replica_groups,
            ),
            build_optimizers_fn=self._build_optimizers,
        )

    def _build_optimizers(
        self,
        model_parts: list[nn.Module],
        optimizer_config: OptimizerConfig,
        parallel_dims: ParallelDims,
        ft_manager: FTManager | None = None,
    ) -> OptimizersContainer:
        optimizers = build_trinity_optimizers(
            model_parts, optimizer_config, parallel_dims, ft_manager
        )
        self.balancer = ExpertBiasBalancer(model_parts, parallel_dims, self.replica_groups)
        self.step_phases = OptimizerStepPhases(
            optimizers, self._agree_on_step, self._close_step, self._drop_step
        )
        return optimizers

    # ------------------------------------------------------------------ the run
    def train(self) -> None:
        """TorchTitan's loop (its first act is the checkpoint load; a checkpoint of another
        layout has the dataloader load every saved rank's data position), then the HF export's
        config and tokenizer next to its weights."""
        if self.run_start.reshard_keys is not None:
            self.dataloader.expect_resume(self.run_start.reshard_keys)
        with exit_on_config_error(every_rank=True):
            super().train()
        self._complete_hf_export()

    def state_dict(self) -> dict[str, Any]:
        """TorchTitan's train state plus the global token count, which, unlike TorchTitan's
        per-rank `ntokens_seen`, stays right across a change of the data-parallel degree."""
        return {**super().state_dict(), "global_tokens_seen": self.global_tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._global_tokens_base = (int(state_dict["global_tokens_seen"]), self.ntokens_seen)

    @property
    def global_tokens_seen(self) -> int:
        """Training tokens of all data-parallel ranks before the current step."""
        tokens, ntokens = self._global_tokens_base
        return tokens + (self.ntokens_seen - ntokens) * self._batch_degree

    def _complete_hf_export(self) -> None:
        """`--checkpoint.last_save_in_hf` has TorchTitan write the last step's weights only (via
        the state dict adapter); add config.json, generation_config.json and the tokenizer
        files, so that transformers loads the folder as it is."""
        checkpoint, steps = self.job_config.checkpoint, self.job_config.training.steps
        if not (self.checkpointer.enable and checkpoint.last_save_in_hf and self.step == steps):
            return
        if torch.distributed.get_rank() != 0:
            return
        folder = checkpoint_folder(self.checkpointer, self.step)
        written = write_hf_metadata(
            folder,
            self.model_args,
            Path(self.job_config.model.hf_assets_path),
            TORCH_DTYPE_MAP[checkpoint.export_dtype],
        )
        logger.info(f"HF export {folder}: wrote {', '.join(written)} next to the weights")

    # ------------------------------------------------------------------ per step
    def _agree_on_step(self) -> StepClosing:
        """Before the optimizer step (under torchft, before its commit vote): every collective
        of the step's closing. Is it finite everywhere, and the global expert counts."""
        bad = self.nan_guard.check_step() if self.nan_guard.enabled else None
        return StepClosing(bad, self.balancer.gather() if bad is None else None)

    def _close_step(self, closing: StepClosing) -> None:
        """Right before the update: balance the experts and keep the loss statistics, or, on a
        non-finite step, forget the step and drop its gradients so that no update happens."""
        bad = closing.bad
        if bad is None:
            self.balancer.apply(closing.counts)
            self.loss_stats.close_step()
            return
        self.balancer.discard_step()
        self.loss_stats.discard_step()
        drop_gradients(self.model_parts)
        if self.nan_guard.skip(bad):
            self._stop_after_step = bad

    def _drop_step(self, closing: StepClosing) -> None:
        """torchft did not commit the step (a replica group failed during it, or too few are
        alive): no parameter changed, so neither do the biases; the step's counts and loss
        statistics are forgotten."""
        self.balancer.discard_step()
        self.loss_stats.discard_step()
        logger.warning(f"Step {self.step} was not committed by torchft: its update is dropped")

    def batch_generator(self, data_iterable):
        """TorchTitan's batches, with the skipped-document counts taken out before the model
        sees them; a bad document met while training ends the run with its one-line message."""
        with exit_on_config_error(every_rank=True):
            for input_dict, labels in super().batch_generator(data_iterable):
                if self.skipped_documents is not None:
                    self.skipped_documents.take(input_dict)
                if self.row_trace is not None:
                    self.row_trace.take(input_dict, self.step)
                yield input_dict, labels

    def train_step(self, data_iterator):
        """Batch ramp: set gradient accumulation from the global tokens seen before this step.
        A stop of the NaN guard happens after the step, so the LR schedule has advanced."""
        if self.batch_ramp.thresholds:
            tokens = self.global_tokens_seen
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
        super().train_step(data_iterator)
        bad, self._stop_after_step = self._stop_after_step, None
        if bad is not None:
            saved = save_full_checkpoint(self.checkpointer, self.step)
            raise self.nan_guard.stop_error(bad, saved=saved)

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
        if self.fused_loss is not None:
            extra_inputs["labels"] = labels
            extra_kwargs["fused_loss"] = self.fused_loss
        return inputs, labels, extra_inputs, extra_kwargs


def with_trinity_config(argv: list[str]) -> list[str]:
    """`argv` plus `--job.custom_config_module trinity_titan.job_config` unless the command line
    or its TOML names a module, so that Trinity's TOML sections parse without that line."""
    names = ("--job.custom_config_module", "--job.custom-config-module")
    if any(a.split("=")[0] in names for a in argv):
        return argv
    config_file = next(
        (
            a.split("=", 1)[1] if "=" in a else argv[i + 1]
            for i, a in enumerate(argv)
            if a.split("=")[0] in ("--job.config_file", "--job.config-file")
            and ("=" in a or i + 1 < len(argv))
        ),
        None,
    )
    if config_file is not None and os.path.isfile(config_file):
        with open(config_file, "rb") as f:
            if tomllib.load(f).get("job", {}).get("custom_config_module"):
                return argv
    return [*argv, "--job.custom_config_module", CONFIG_MODULE]


if __name__ == "__main__":
    set_command_line(with_trinity_config(sys.argv[1:]))
    main(TrinityTrainer)
