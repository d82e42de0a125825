"""Documents being read into rows, and sequential packing (the baseline RSDB replaces).

Token ids are int32 (vocabularies < 2^31). Rows are `row_len` tokens (seq_len + 1: the input is
row[:-1], the labels row[1:]). Every token of every document lands in exactly one row; the EOS
closing each document keeps the boundaries for document masking. Long documents fill many
consecutive rows, which is what makes the loss of a micro-batch depend on a single source (RSDB's
motivation).

A document being read is an `OpenDocument`: its tokens, its read head, and where it came from.
The state of a packer keeps only the address and head of a local document (its tokens are read
again on resume, so a buffer of thousands of documents costs a few bytes each in the checkpoint);
a hub document, which has no address, keeps its unread tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

DocAddress = tuple[int, int, int, int]
"""(source, epoch, block, index in block) of a local document."""


@dataclass
class OpenDocument:
    """A document whose tokens [head:] are still to be emitted."""

    tokens: np.ndarray
    address: DocAddress | None = None
    head: int = 0

    @property
    def left(self) -> int:
        return len(self.tokens) - self.head

    def take(self, n: int) -> tuple[np.ndarray, Piece]:
        """Up to `n` tokens from the head, and the piece of the document they are."""
        start = self.head
        self.head = min(len(self.tokens), start + n)
        return self.tokens[start : self.head], Piece(self.address, start, self.head)


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of a document, as they went into a row (for the row trace)."""

    address: DocAddress | None
    start: int
    end: int


NextDoc = Callable[[], OpenDocument]
"""Returns the next document; raises StopIteration when the stream is exhausted."""
Fetch = Callable[[DocAddress], np.ndarray]
"""The tokens of a local document, read again from its address."""


def documents_state(docs: list[OpenDocument]) -> dict[str, Any]:
    """The open documents as addresses and heads; hub documents with their unread tokens."""
    local = [d for d in docs if d.address is not None]
    hub = [d for d in docs if d.address is None]
    return {
        "addresses": np.asarray([d.address for d in local], np.int64).reshape(-1, 4),
        "heads": np.asarray([d.head for d in local], np.int64),
        "order": np.asarray([d.address is None for d in docs], np.bool_),
        "unread": [d.tokens[d.head :].copy() for d in hub],
    }


def documents_from_state(state: dict[str, Any], fetch: Fetch) -> list[OpenDocument]:
    """The open documents of `documents_state`, in their order, local ones read again."""
    local = iter(zip(state["addresses"].tolist(), state["heads"].tolist(), strict=True))
    hub = iter(state["unread"])
    docs = []
    for is_hub in state["order"].tolist():
        if is_hub:
            docs.append(OpenDocument(np.asarray(next(hub), np.int32)))
        else:
            address, head = next(local)
            docs.append(OpenDocument(fetch(tuple(address)), tuple(address), int(head)))
    return docs


class SequentialPacker:
    """Documents in stream order, each read to its end before the next."""

    def __init__(self, next_doc: NextDoc, row_len: int):
        self.next_doc = next_doc
        self.row_len = row_len
        self.open: list[OpenDocument] = []
        """Documents begun and not finished: one, or several after a reshard."""
        self._exhausted = False

    def next_row(self) -> tuple[np.ndarray, list[Piece]]:
        """`row_len` tokens and their pieces; the last row of a finite stream may be shorter;
        then StopIteration."""
        parts, pieces, need = [], [], self.row_len
        while need:
            if not self.open:
                if self._exhausted:
                    break
                try:
                    self.open.append(self.next_doc())
                except StopIteration:
                    self._exhausted = True
                    break
                continue
            tokens, piece = self.open[0].take(need)
            parts.append(tokens)
            pieces.append(piece)
            need -= len(tokens)
            if not self.open[0].left:
                self.open.pop(0)
        if not parts:
            raise StopIteration
        return np.concatenate(parts), pieces

    def state_dict(self) -> dict[str, Any]:
        return {"open": documents_state(self.open), "exhausted": self._exhausted}

    def load_state_dict(self, state: dict[str, Any], fetch: Fetch) -> None:
        self.open = documents_from_state(state["open"], fetch)
        self._exhausted = bool(state["exhausted"])

    def add(self, docs: list[OpenDocument]) -> None:
        """Take over open documents (a reshard hands each new reader its share)."""
        self.open.extend(d for d in docs if d.left)
