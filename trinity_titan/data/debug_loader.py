"""The debug loader: a global batch that does not depend on the data-parallel degree.

Every rank reads the same packed sample stream and keeps its own rows of each global micro-batch,
so a run on N ranks sees exactly the batches of a 1-rank run with the same global batch. This
makes parallelism degrees swappable without changing the loss, also on resume (every rank's
saved state is the same); each rank tokenizes the whole stream, which is cheap for small models
and the tests.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

from trinity_titan.data.elastic import ElasticDataloader, global_batch_size


class RankRowsOfGlobalBatch(IterableDataset, Stateful):
    """Groups `dp_world_size * local_batch_size` samples and yields rows [rank*L, (rank+1)*L)."""

    def __init__(
        self,
        samples: HuggingFaceTextDataset,
        dp_rank: int,
        dp_world_size: int,
        local_batch_size: int,
    ):
        self.samples = samples
        self.first = dp_rank * local_batch_size
        self.last = self.first + local_batch_size
        self.group = dp_world_size * local_batch_size

    def __iter__(self):
        stream = iter(self.samples)
        while True:
            rows = []
            for _ in range(self.group):
                try:
                    rows.append(next(stream))
                except StopIteration:
                    return
            yield from rows[self.first : self.last]

    def state_dict(self) -> dict[str, Any]:
        return self.samples.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples.load_state_dict(state_dict)


def build_debug_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ElasticDataloader:
    training = job_config.training
    samples = HuggingFaceTextDataset(
        dataset_name=training.dataset,
        dataset_path=training.dataset_path,
        tokenizer=tokenizer,
        seq_len=training.seq_len,
        dp_rank=0,
        dp_world_size=1,
        infinite=infinite,
    )
    return ElasticDataloader(
        RankRowsOfGlobalBatch(samples, dp_rank, dp_world_size, training.local_batch_size),
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        global_batch_size=global_batch_size(job_config, dp_world_size),
        dp_invariant=True,
        **asdict(training.dataloader),
        batch_size=training.local_batch_size,
    )
