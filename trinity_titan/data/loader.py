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
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from trinity_titan.data.debug_loader import build_debug_dataloader
from trinity_titan.data.elastic import ElasticDataloader, global_batch_size
from trinity_titan.data.mixture import Mixture, PhaseSchedule
from trinity_titan.data.packing import OpenDocument, SequentialPacker
from trinity_titan.data.rsdb import RSDB
from trinity_titan.data.skip_count import SKIPPED_KEY
from trinity_titan.data.sources import (
    HFDocumentSource,
    LocalDocumentSource,
    SourceSpec,
    local_corpus,
)
from trinity_titan.data.trace import TRACE_KEY, trace_tensor
from trinity_titan.job_config import ConfigError


class PackedDocumentStream(IterableDataset, Stateful):
    """Rows of one reader's shard (reader = dp_rank * workers + worker).
    `make_sources(shard, num_shards)` opens the sources.

    The state is the reader's: its sources' positions, the mixture RNG, the packer's open
    documents, and the tokens it emitted since `base_tokens` (the global count at the start of
    its `generation`, i.e. at the last change of layout; data/position.py). `resume_from`, set
    by the dataloader before the workers start, holds the states a reshard made, by reader.
    """

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
        trace_rows: bool = False,
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
        self.trace_rows = trace_rows
        self.resume_from: dict[int, dict[str, Any]] = {}
        self.worker = 0
        self.shard, self.num_shards = dp_rank, dp_world_size
        self.generation = 0
        self.base_tokens = 0
        self.tokens = 0  # training tokens this reader emitted in this generation
        self.dropped_tail = 0
        """Tokens of a finite stream's last, short row (never trained)."""
        self.mixture: Mixture | None = None
        self.packer: RSDB | SequentialPacker | None = None
        self._pending: dict[str, Any] | None = None

    def _build(self) -> None:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self.worker = worker
        self.shard = self.dp_rank * workers + worker
        self.num_shards = self.dp_world_size * workers
        state = self._pending or self.resume_from.get(self.shard)
        self._pending = None
        self.generation = int(state["generation"]) if state else 0
        self.base_tokens = int(state["base_tokens"]) if state else 0
        self.tokens = int(state["tokens"]) if state else 0
        self.dropped_tail = int(state["dropped_tail"]) if state else 0
        seed = [self.seed, self.generation, self.shard]
        self.mixture = Mixture(
            self.make_sources(self.shard, self.num_shards), self.schedule, seed=[*seed, 0]
        )
        if self.mixing == "rsdb":
            self.packer = RSDB(
                self._next_doc,
                self.seq_len + 1,
                buffer_docs=math.ceil(self.rsdb_buffer_docs / workers),
                seed=[*seed, 1],
            )
        else:
            self.packer = SequentialPacker(self._next_doc, self.seq_len + 1)
        if state:
            if (state["shard"], state["num_shards"]) != (self.shard, self.num_shards):
                raise RuntimeError(
                    f"data reader {self.shard} of {self.num_shards} got the state of reader "
                    f"{state['shard']} of {state['num_shards']}"
                )
            self.mixture.load_state_dict(state["mixture"])
            self.packer.load_state_dict(state["packer"], self.mixture.fetch)

    def global_tokens(self) -> int:
        """Training tokens emitted by all readers (they advance in lockstep)."""
        return self.base_tokens + self.tokens * self.num_shards

    def _next_doc(self) -> OpenDocument:
        return self.mixture.next_document(self.global_tokens())

    def __iter__(self):
        self._build()
        while True:
            try:
                row, pieces = self.packer.next_row()
            except StopIteration:
                return
            if len(row) <= self.seq_len:  # the short tail of a finite stream
                self.dropped_tail += len(row)
                return
            self.tokens += self.seq_len
            row = torch.from_numpy(row.astype("int64"))
            inputs = {"input": row[:-1]}
            if self.report_skipped:
                skipped = sum(s.skipped for s in self.mixture.sources)
                inputs[SKIPPED_KEY] = torch.tensor([self.worker, skipped])
            if self.trace_rows:
                inputs[TRACE_KEY] = trace_tensor(pieces, self.seq_len + 1)
            yield inputs, row[1:]

    def state_dict(self) -> dict[str, Any]:
        if self.packer is None:
            return self._pending or {}
        return {
            "shard": self.shard,
            "num_shards": self.num_shards,
            "generation": self.generation,
            "base_tokens": self.base_tokens,
            "tokens": self.tokens,
            "dropped_tail": self.dropped_tail,
            "mixture": self.mixture.state_dict(),
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict or None
        self.packer = self.mixture = None

    def resume_readers(self, states: dict[int, dict[str, Any]]) -> None:
        """Start this rank's readers (by reader index) from a reshard's states; the workers get
        them with the dataset when they start."""
        self.resume_from = states
        self._pending = None
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
    trace_rows: bool = False,
) -> ElasticDataloader:
    """The TrainSpec's build_dataloader_fn: the [data] pipeline, or the debug loader without it.
    `report_skipped` / `trace_rows`: the trainer takes skipped-document counts / row pieces out
    of each batch."""
    data, training = job_config.data, job_config.training
    if not data.sources:
        return build_debug_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite)

    specs = [SourceSpec.from_dict(d) for d in data.sources]
    corpora = [local_corpus(s, data.jsonl_block_bytes, data.table_block_rows) for s in specs]
    loop = infinite and data.infinite
    skip_bad = data.on_bad_document == "skip"

    def make_sources(shard: int, num_shards: int):
        return [
            HFDocumentSource(spec, tokenizer, shard, num_shards, loop, skip_bad)
            if corpus is None
            else LocalDocumentSource(
                spec, corpus, tokenizer, shard, num_shards, loop, skip_bad, (data.seed, k)
            )
            for k, (spec, corpus) in enumerate(zip(specs, corpora, strict=True))
        ]

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
        trace_rows=trace_rows and data.trace_rows,
    )
    return ElasticDataloader(
        stream,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        global_batch_size=global_batch_size(job_config, dp_world_size),
        **asdict(training.dataloader),
        batch_size=training.local_batch_size,
        snapshot_every_n_steps=data.snapshot_every_n_batches,
    )
