"""The row trace (`[data] trace_rows`): the document pieces of every row this rank trains on.

The pieces travel with each sample (data/trace.py) because the rows are made in dataloader worker
processes; the trainer takes them out of the batch before the model sees it and appends one JSON
line per row to `<dump_folder>/row_trace/rank<R>.jsonl`: {"step", "pieces": [[source, epoch,
block, index, start, end], ...]}. A resumed run appends to the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trinity_titan.data.trace import TRACE_KEY, trace_pieces


class RowTrace:
    """Appends the pieces of this rank's trained rows to its trace file."""

    def __init__(self, dump_folder: str, rank: int):
        self.path = Path(dump_folder) / "row_trace" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def take(self, input_dict: dict[str, torch.Tensor], step: int) -> None:
        """Remove the pieces from a batch and write them, one line per row."""
        trace = input_dict.pop(TRACE_KEY, None)
        if trace is None:
            return
        with self.path.open("a") as f:
            for pieces in trace_pieces(trace):
                f.write(json.dumps({"step": step, "pieces": pieces}) + "\n")
