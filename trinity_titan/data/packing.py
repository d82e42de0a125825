"""Sequential packing: documents laid end to end and cut into rows (the baseline RSDB replaces).

Token ids are int32 (vocabularies < 2^31). Rows are `row_len` tokens (seq_len + 1: the input is row[:-1], the labels row[1:]). Every token of
every document lands in exactly one row; the EOS closing each document keeps the boundaries for
document masking. Long documents fill many consecutive rows, which is what makes the loss of a
micro-batch depend on a single source (RSDB's motivation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

NextDoc = Callable[[], np.ndarray]
"""Returns the next tokenized document; raises StopIteration when the stream is exhausted."""


class SequentialPacker:
    """One document with a read head at a time, filled into rows in stream order."""

    def __init__(self, next_doc: NextDoc, row_len: int):
        self.next_doc = next_doc
        self.row_len = row_len
        self._doc = np.empty(0, dtype=np.int32)
        self._exhausted = False

    def next_row(self) -> np.ndarray:
        """`row_len` tokens; the last row of a finite stream may be shorter; then StopIteration."""
        parts, need = [], self.row_len
        while need:
            if not len(self._doc):
                if self._exhausted:
                    break
                try:
                    self._doc = np.asarray(self.next_doc(), dtype=np.int32)
                except StopIteration:
                    self._exhausted = True
                    break
                continue
            parts.append(self._doc[:need])
            need -= len(parts[-1])
            self._doc = self._doc[len(parts[-1]) :]
        if not parts:
            raise StopIteration
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"doc": self._doc.copy(), "exhausted": self._exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._doc = np.asarray(state["doc"], dtype=np.int32)
        self._exhausted = bool(state["exhausted"])
