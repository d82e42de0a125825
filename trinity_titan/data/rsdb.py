"""RSDB, the Random Sequential Document Buffer of the Trinity Large report.

Whole tokenized documents sit in a buffer, each with a read head. To fill a row, a buffered
document is picked uniformly at random and tokens are copied from its read head, which advances;
if the row is not yet full another document is picked. A spent document is purged. The buffer holds
up to 2x the configured number of documents and is refilled in bulk (back to 2x) whenever it falls
to the configured number, so a long document is spread over many rows of many batches instead of
filling consecutive rows, which lowers the loss spread between micro-batches (BatchHet).

Every token is emitted exactly once and in order within its document; rows are full except the
last one of a finite stream. The state (every buffered document's address and read head, or its
unread tokens for a hub document, and the RNG; see data/packing.py) is checkpointable, so a
resumed stream continues with the identical rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trinity_titan.data.packing import (
    Fetch,
    NextDoc,
    OpenDocument,
    Piece,
    documents_from_state,
    documents_state,
)


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
        self._docs: list[OpenDocument] = []
        self._exhausted = False

    def __len__(self) -> int:
        return len(self._docs)

    def _refill(self) -> None:
        """Bulk refill to 2x the configured size (called when it has fallen to the configured size)."""
        while len(self._docs) < self.capacity and not self._exhausted:
            try:
                doc = self.next_doc()
            except StopIteration:
                self._exhausted = True
                break
            if doc.left:
                self._docs.append(doc)

    def next_row(self) -> tuple[np.ndarray, list[Piece]]:
        """`row_len` tokens and their pieces; the last row of a finite stream may be shorter;
        then StopIteration."""
        parts, pieces, need = [], [], self.row_len
        while need:
            if len(self._docs) <= self.buffer_docs:
                self._refill()
            if not self._docs:
                break
            i = int(self._rng.integers(len(self._docs)))
            tokens, piece = self._docs[i].take(need)
            parts.append(tokens)
            pieces.append(piece)
            need -= len(tokens)
            if not self._docs[i].left:  # spent: purge (swap with the last: O(1) removal)
                self._docs[i] = self._docs[-1]
                self._docs.pop()
        if not parts:
            raise StopIteration
        return np.concatenate(parts), pieces

    def state_dict(self) -> dict[str, Any]:
        return {
            "open": documents_state(self._docs),
            "rng": self._rng.bit_generator.state,
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: dict[str, Any], fetch: Fetch) -> None:
        self._docs = documents_from_state(state["open"], fetch)
        if state["rng"] is not None:  # None: a reshard's new reader keeps its fresh seed
            self._rng.bit_generator.state = state["rng"]
        self._exhausted = bool(state["exhausted"])

    def add(self, docs: list[OpenDocument]) -> None:
        """Take over open documents (a reshard hands each new reader its share)."""
        self._docs.extend(d for d in docs if d.left)
