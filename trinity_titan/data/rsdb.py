"""RSDB, the Random Sequential Document Buffer of the Trinity Large report.

Whole tokenized documents sit in a buffer, each with a read head. To fill a row, a buffered
document is picked uniformly at random and tokens are copied from its read head, which advances;
if the row is not yet full another document is picked. A spent document is purged. The buffer holds
up to 2x the configured number of documents and is refilled in bulk (back to 2x) whenever it falls
to the configured number, so a long document is spread over many rows of many batches instead of
filling consecutive rows, which lowers the loss spread between micro-batches (BatchHet).

Every token is emitted exactly once and in order within its document; rows are full except the
last one of a finite stream. The state (remaining tokens of every buffered document, the RNG) is
checkpointable, so a resumed stream continues with the identical rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trinity_titan.data.packing import NextDoc


class RSDB:
    """Random Sequential Document Buffer over `next_doc`, emitting rows of `row_len` tokens."""

    def __init__(self, next_doc: NextDoc, row_len: int, buffer_docs: int, seed: int | list[int]):
        if buffer_docs < 1:
            raise ValueError(f"RSDB needs buffer_docs >= 1, got {buffer_docs}")
        self.next_doc = next_doc
        self.row_len = row_len
        self.buffer_docs = buffer_docs
        self.capacity = 2 * buffer_docs
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        self._docs: list[np.ndarray] = []  # remaining tokens of each doc: doc[read_head:]
        self._exhausted = False

    def __len__(self) -> int:
        return len(self._docs)

    def _refill(self) -> None:
        """Bulk refill to 2x the configured size (called when it has fallen to the configured size)."""
        while len(self._docs) < self.capacity and not self._exhausted:
            try:
                doc = np.asarray(self.next_doc(), dtype=np.int32)
            except StopIteration:
                self._exhausted = True
                break
            if len(doc):
                self._docs.append(doc)

    def next_row(self) -> np.ndarray:
        """`row_len` tokens; the last row of a finite stream may be shorter; then StopIteration."""
        parts, need = [], self.row_len
        while need:
            if len(self._docs) <= self.buffer_docs:
                self._refill()
            if not self._docs:
                break
            i = int(self._rng.integers(len(self._docs)))
            doc = self._docs[i]
            parts.append(doc[:need])
            need -= len(parts[-1])
            if len(doc) > len(parts[-1]):
                self._docs[i] = doc[len(parts[-1]) :]
            else:  # spent: purge (swap with the last, so removal is O(1))
                self._docs[i] = self._docs[-1]
                self._docs.pop()
        if not parts:
            raise StopIteration
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, Any]:
        lengths = np.array([len(d) for d in self._docs], dtype=np.int64)
        tokens = np.concatenate(self._docs) if self._docs else np.empty(0, dtype=np.int32)
        return {
            "tokens": tokens,
            "lengths": lengths,
            "rng": self._rng.bit_generator.state,
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tokens = np.asarray(state["tokens"], dtype=np.int32)
        ends = np.cumsum(np.asarray(state["lengths"], dtype=np.int64))
        starts = ends - np.asarray(state["lengths"], dtype=np.int64)
        self._docs = [tokens[s:e].copy() for s, e in zip(starts, ends, strict=True)]
        self._rng.bit_generator.state = state["rng"]
        self._exhausted = bool(state["exhausted"])
