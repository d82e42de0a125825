"""The `trinity` TrainSpec's dataloader: HF sources -> phase mixture -> RSDB or sequential rows.

With `[[data.sources]]` configured, every data-parallel rank reads its own shard, split further
over its `[training.dataloader] num_workers` worker processes (each with its own sources, mixture
RNG and RSDB buffer of rsdb_buffer_docs / num_workers documents). Rows are seq_len + 1 tokens cut
into ({"input": row[:-1]}, row[1:]); documents end in EOS, which is what document masking
(`attn_mask_type = "block_causal"`) splits on. TorchTitan's ParallelAwareDataloader (torchdata's
StatefulDataLoader) checkpoints each worker's state: sources' file positions and epochs, the
mixture RNG, the RSDB buffer with its read heads and RNG, and the tokens emitted (the phase).

Without sources the DP-invariant debug loader (data/debug_loader.py) is used unchanged.

With `[data] on_bad_document = "skip"` and `report_skipped` (Trinity's trainer), every sample also
carries its worker's count of skipped documents (`SKIPPED_KEY`, see data/skip_count.py), which the
trainer takes out of the batch before the model sees it.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from trinity_titan.data.debug_loader import build_debug_dataloader
from trinity_titan.data.mixture import Mixture, PhaseSchedule
from trinity_titan.data.packing import SequentialPacker
from trinity_titan.data.rsdb import RSDB
from trinity_titan.data.skip_count import SKIPPED_KEY
from trinity_titan.data.sources import HFDocumentSource, SourceSpec
from trinity_titan.job_config import ConfigError


class PackedDocumentStream(IterableDataset, Stateful):
    """Rows of one (DP rank, worker) shard. `make_sources(shard, num_shards)` opens the sources."""

    def __init__(
        self,
        make_sources,
        schedule: PhaseSchedule,
        seq_len: int,
        mixing: str = "rsdb",
        rsdb_buffer_docs: int = 8192,
        seed: int = 0,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        report_skipped: bool = False,
    ):
        self.make_sources = make_sources
        self.schedule = schedule
        self.seq_len = seq_len
        self.mixing = mixing
        self.rsdb_buffer_docs = rsdb_buffer_docs
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.report_skipped = report_skipped
        self.worker = 0
        self.tokens = 0  # training tokens this shard emitted
        self.mixture: Mixture | None = None
        self.packer: RSDB | SequentialPacker | None = None
        self._pending: dict[str, Any] | None = None

    def _build(self) -> None:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self.worker = worker
        shard, self.num_shards = self.dp_rank * workers + worker, self.dp_world_size * workers
        self.mixture = Mixture(
            self.make_sources(shard, self.num_shards),
            self.schedule,
            seed=[self.seed, self.dp_rank, worker, 0],
        )
        if self.mixing == "rsdb":
            self.packer = RSDB(
                self._next_doc,
                self.seq_len + 1,
                buffer_docs=math.ceil(self.rsdb_buffer_docs / workers),
                seed=[self.seed, self.dp_rank, worker, 1],
            )
        else:
            self.packer = SequentialPacker(self._next_doc, self.seq_len + 1)
        self.tokens = 0
        if self._pending:
            self.tokens = int(self._pending["tokens"])
            self.mixture.load_state_dict(self._pending["mixture"])
            self.packer.load_state_dict(self._pending["packer"])
        self._pending = None

    def global_tokens(self) -> int:
        """Training tokens emitted by all shards (they advance in lockstep)."""
        return self.tokens * self.num_shards

    def _next_doc(self):
        return self.mixture.next_document(self.global_tokens())

    def __iter__(self):
        self._build()
        while True:
            try:
                row = self.packer.next_row()
            except StopIteration:
                return
            if len(row) <= self.seq_len:  # the short tail of a finite stream
                return
            self.tokens += self.seq_len
            row = torch.from_numpy(row.astype("int64"))
            inputs = {"input": row[:-1]}
            if self.report_skipped:
                skipped = sum(s.skipped for s in self.mixture.sources)
                inputs[SKIPPED_KEY] = torch.tensor([self.worker, skipped])
            yield inputs, row[1:]

    def state_dict(self) -> dict[str, Any]:
        if self.packer is None:
            return self._pending or {}
        return {
            "tokens": self.tokens,
            "mixture": self.mixture.state_dict(),
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict or None
        self.packer = self.mixture = None


def schedule_from_config(specs: list[SourceSpec], phases: list[dict[str, Any]]) -> PhaseSchedule:
    if not phases:
        return PhaseSchedule.single([s.weight for s in specs])
    for p in phases:
        if set(p) != {"tokens", "weights"}:
            raise ConfigError(f"[[data.phases]] entry {p}: needs exactly tokens and weights")
    return PhaseSchedule([int(p["tokens"]) for p in phases], [list(p["weights"]) for p in phases])


def build_data_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
    report_skipped: bool = False,
) -> ParallelAwareDataloader:
    """The TrainSpec's build_dataloader_fn: the [data] pipeline, or the debug loader without it.
    `report_skipped`: the trainer takes skipped-document counts out of each batch."""
    data, training = job_config.data, job_config.training
    if not data.sources:
        return build_debug_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite)

    specs = [SourceSpec.from_dict(d) for d in data.sources]
    loop = infinite and data.infinite

    skip_bad = data.on_bad_document == "skip"

    def make_sources(shard: int, num_shards: int):
        return [HFDocumentSource(s, tokenizer, shard, num_shards, loop, skip_bad) for s in specs]

    stream = PackedDocumentStream(
        make_sources,
        schedule_from_config(specs, data.phases),
        seq_len=training.seq_len,
        mixing=data.mixing,
        rsdb_buffer_docs=data.rsdb_buffer_docs,
        seed=data.seed,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        report_skipped=report_skipped and skip_bad,
    )
    return ParallelAwareDataloader(
        stream,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **asdict(training.dataloader),
        batch_size=training.local_batch_size,
        snapshot_every_n_steps=data.snapshot_every_n_batches,
    )
