"""Row provenance (`[data] trace_rows`): which tokens of which document every row holds.

Each row of the `[data]` pipeline is cut from pieces of documents (data/packing.py). With
`trace_rows`, every sample carries its pieces (`TRACE_KEY`: one (source, epoch, block, index,
start, end) per piece, padded with -1 to one entry per token of the row; a hub document has
address -1), and Trinity's trainer writes those of the rows it trains on to
`<dump_folder>/row_trace/rank<R>.jsonl` (training/row_trace.py). That answers "what did the model
see at step N", and the tests use it to check that across a change of layout every token of every
document is trained on exactly once.
"""

from __future__ import annotations

import torch

from trinity_titan.data.packing import Piece

TRACE_KEY = "row_trace"
"""The batch entry with a row's pieces."""


def trace_tensor(pieces: list[Piece], row_len: int) -> torch.Tensor:
    """[row_len, 6] int64: the pieces, then rows of -1."""
    out = torch.full((row_len, 6), -1, dtype=torch.int64)
    for i, p in enumerate(pieces):
        out[i] = torch.tensor([*(p.address or (-1, -1, -1, -1)), p.start, p.end])
    return out


def trace_pieces(trace: torch.Tensor) -> list[list[list[int]]]:
    """The pieces of every row of a batch's [rows, row_len, 6] trace, padding removed."""
    return [[p for p in row if p[5] >= 0] for row in trace.tolist()]
