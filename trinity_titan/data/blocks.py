"""A local source cut into blocks: the unit of reading that does not depend on the layout.

Elastic resume needs a data position that means the same on any number of ranks and workers. HF's
streaming position (file and offset per shard) does not: the shards are made for one layout. The
files of a local source are instead cut into a fixed list of blocks, numbered in file order, and
every document has an address (block, index in block) whatever the layout:

- JSON lines: byte ranges of about `[data] jsonl_block_bytes`, each cut moved to the next line end;
- a JSON array file: one block (it must be parsed whole);
- parquet: `[data] table_block_rows` rows of one row group; arrow: as many rows.

A block is read whole (a few MiB), its documents in order. Blank JSON lines are not documents.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trinity_titan.data.validate import FORMATS, BadDocumentError


@dataclass(frozen=True)
class Block:
    """Documents `[start, stop)` of file `file`: bytes (JSON lines), rows (arrow), or rows of
    row group `group` (parquet). A JSON array file is one block with start = stop = 0."""

    file: int
    start: int
    stop: int
    group: int = 0


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"[")


def _jsonl_blocks(file: int, path: str, block_bytes: int) -> list[Block]:
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] < size:
            target = cuts[-1] + block_bytes
            if target >= size:
                cuts.append(size)
                break
            f.seek(target - 1)
            f.readline()  # to the end of the line that holds byte target - 1
            cuts.append(min(f.tell(), size))
    return [Block(file, a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _arrow_reader(path: str):
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


class BlockedFiles:
    """The blocks of one local source's files (`files`, in the order given)."""

    def __init__(
        self, files: list[str], text_field: str, jsonl_block_bytes: int, table_block_rows: int
    ):
        self.files = files
        self.text_field = text_field
        self.kind = FORMATS[os.path.splitext(files[0])[1]]
        blocks: list[Block] = []
        for i, path in enumerate(files):
            if self.kind == "json":
                if _is_json_array(path):
                    blocks.append(Block(i, 0, 0))
                else:
                    blocks.extend(_jsonl_blocks(i, path, jsonl_block_bytes))
            elif self.kind == "parquet":
                meta = pq.ParquetFile(path).metadata
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    for a in range(0, rows, table_block_rows):
                        blocks.append(Block(i, a, min(a + table_block_rows, rows), g))
            else:
                rows = _arrow_reader(path).num_rows
                for a in range(0, rows, table_block_rows):
                    blocks.append(Block(i, a, min(a + table_block_rows, rows)))
        self.blocks = blocks
        self._table: tuple[tuple[int, int], pa.Array] | None = None
        """The text column last read ((file, row group), column): a row group holds many
        blocks, which are read in order."""

    def __len__(self) -> int:
        return len(self.blocks)

    def where(self, block: int, index: int) -> str:
        """A document's place for messages: the file and its line or row."""
        b = self.blocks[block]
        return f"{self.files[b.file]} (block {block}, document {index} of the block)"

    def records(self, block: int) -> list[Any]:
        """The documents of `block` in order: parsed JSON values (JSON), or {text_field: value}
        (parquet, arrow). A line that is not JSON raises BadDocumentError."""
        b = self.blocks[block]
        path = self.files[b.file]
        if self.kind == "json":
            with open(path, "rb") as f:
                if b.stop == 0:
                    records = json.loads(f.read())
                    return records if isinstance(records, list) else [records]
                f.seek(b.start)
                lines = [line for line in f.read(b.stop - b.start).splitlines() if line.strip()]
            out = []
            for n, line in enumerate(lines):
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise BadDocumentError(
                        f"data file {self.where(block, n)} is not valid JSON ({e}). Fix: repair "
                        'the file, or check it before training with [data] validate = "full".'
                    ) from None
            return out
        if self._table is None or self._table[0] != (b.file, b.group):
            if self.kind == "parquet":
                table = pq.ParquetFile(path).read_row_group(b.group, columns=[self.text_field])
            else:
                table = _arrow_reader(path).select([self.text_field])
            self._table = ((b.file, b.group), table.column(0))
        column = self._table[1].slice(b.start, b.stop - b.start).to_pylist()
        return [{self.text_field: v} for v in column]
