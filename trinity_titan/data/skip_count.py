"""The count of skipped bad documents (`[data] on_bad_document = "skip"`) for the metrics.

The readers that skip live in the dataloader's worker processes, so the count cannot be shared by
reference: each sample carries its worker's running count (`SKIPPED_KEY`: [worker id, count]),
which is part of the readers' checkpointed state. Trinity's trainer takes it out of every batch
into `SkippedDocuments`, which it hands to the metrics processor (`data/skipped_documents`).
"""

from __future__ import annotations

import torch

SKIPPED_KEY = "skipped_documents"
"""The batch entry with the [worker id, skipped documents] of the worker that made the sample."""


class SkippedDocuments:
    """Documents this rank's readers skipped, summed over its dataloader workers."""

    def __init__(self) -> None:
        self.per_worker: dict[int, int] = {}
        """Worker id -> its readers' running count (the latest the batches brought)."""

    def take(self, input_dict: dict[str, torch.Tensor]) -> None:
        """Remove the counts from a batch (the model must not see them) and keep the latest."""
        counts = input_dict.pop(SKIPPED_KEY, None)
        if counts is None:
            return
        for worker, count in counts.reshape(-1, 2).tolist():
            self.per_worker[worker] = max(self.per_worker.get(worker, 0), count)

    @property
    def total(self) -> int:
        return sum(self.per_worker.values())
