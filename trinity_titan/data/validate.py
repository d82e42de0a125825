"""The corpus, checked before compute: every document of every local source file.

A bad document otherwise surfaces when the reader reaches it, hours into a run, as a bare
tokenizer `TypeError` (a missing text field), an Arrow error (malformed JSON) or a
`StopIteration` (an empty file), naming no file and no line. Before the model is built the run
scans its local files (`[data] validate`: "full", "head" or "off"), each rank a share of them
(trinity_titan/training/run_start.py gathers the results), and checks that each document

- parses (a JSON line; a parquet or arrow row), and is valid UTF-8,
- has its text field (`text_field` of its `[[data.sources]]` entry), a string, not blank.

A problem is a ConfigError naming the file, the line (jsonl) or row index (parquet, arrow) and the
fix. With `[data] on_bad_document = "skip"` documents without a usable text are counted and
skipped instead (by the reader, `data/sources.py`); what cannot be skipped is still an error:
a line that is not JSON or not UTF-8 (HF's JSON reader fails on the whole file), a text column of
another type, a file without documents. Hub sources cannot be scanned: the reader checks each
document as it reads it, and names the source and its position (`BadDocumentError`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trinity_titan.job_config import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
"""Local file formats by extension (HF `datasets` builder names)."""

_EXAMPLES = 3
"""Bad documents named per file in a message."""


class BadDocumentError(ConfigError):
    """A document the reader cannot use, found while training (no scan covered it)."""


def local_files(path: str) -> list[str]:
    """The data files of a local source: a file, a glob, or a folder (for `save_to_disk`
    folders, the .arrow files, not the .json metadata next to them)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in FORMATS
        )
        if any(not f.endswith(".json") for f in files):
            files = [f for f in files if not f.endswith(".json")]
        return files
    return sorted(glob.glob(path))


def document_problem(doc: Any, text_field: str) -> str | None:
    """Why `doc` (one parsed record) has no usable text (None: it has)."""
    if not isinstance(doc, dict):
        return f"is a JSON {type(doc).__name__}, not an object"
    if text_field not in doc or doc[text_field] is None:
        return f"has no field {text_field!r}"
    text = doc[text_field]
    if not isinstance(text, str):
        return f"has a field {text_field!r} of type {type(text).__name__}, not a string"
    if not text.strip():
        return f"has a blank field {text_field!r}"
    return None


@dataclass
class FileScan:
    """What the scan of one file found."""

    path: str
    text_field: str
    source: str = ""
    """The config entry it belongs to, for messages (e.g. '[[data.sources]] entry 0')."""
    documents: int = 0
    """Documents read (all of them, or the first `head` ones)."""
    bad: int = 0
    """Documents without a usable text (skippable)."""
    examples: list[str] = field(default_factory=list)
    """The first bad documents, e.g. 'line 12: has no field 'text''."""
    fatal: str | None = None
    """A problem no document-skipping can get past."""

    def note_bad(self, where: str, problem: str) -> None:
        self.bad += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(f"{where} {problem}")

    @property
    def usable(self) -> int:
        return self.documents - self.bad


def scan_file(path: str, text_field: str, head: int | None = None, source: str = "") -> FileScan:
    """Scan one local file (all documents, or the first `head`)."""
    scan = FileScan(path, text_field, source)
    kind = FORMATS.get(os.path.splitext(path)[1])
    try:
        if kind == "json":
            _scan_json(scan, head)
        elif kind == "parquet":
            _scan_table(scan, _parquet_batches(path, text_field), head)
        elif kind == "arrow":
            _scan_table(scan, _arrow_batches(path, text_field), head)
        else:
            scan.fatal = f"is not a {'/'.join(FORMATS)} file"
    except (OSError, pa.ArrowException) as e:
        scan.fatal = f"cannot be read ({type(e).__name__}: {e})"
    if scan.fatal is None and scan.documents == 0:
        scan.fatal = "holds no documents (it is empty)"
    return scan


def _scan_json(scan: FileScan, head: int | None) -> None:
    with open(scan.path, "rb") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == b"[":  # a JSON array of records, not JSON lines
            _scan_json_array(scan, f.read(), head)
            return
        for number, line in enumerate(f, start=1):
            if head is not None and scan.documents >= head:
                return
            if not line.strip():
                continue  # blank lines are not documents (HF skips them too)
            try:
                doc = json.loads(line)
            except UnicodeDecodeError as e:
                scan.fatal = f"line {number} is not valid UTF-8 ({e.reason} at byte {e.start})"
                return
            except json.JSONDecodeError as e:
                scan.fatal = f"line {number} is not valid JSON ({e.msg} at column {e.pos + 1})"
                return
            scan.documents += 1
            problem = document_problem(doc, scan.text_field)
            if problem:
                scan.note_bad(f"line {number}", problem)


def _scan_json_array(scan: FileScan, raw: bytes, head: int | None) -> None:
    try:
        records = json.loads(raw)
    except UnicodeDecodeError as e:
        scan.fatal = f"is not valid UTF-8 ({e.reason} at byte {e.start})"
        return
    except ValueError as e:
        scan.fatal = f"is not valid JSON ({e})"
        return
    for i, doc in enumerate(records if isinstance(records, list) else [records]):
        if head is not None and scan.documents >= head:
            return
        scan.documents += 1
        problem = document_problem(doc, scan.text_field)
        if problem:
            scan.note_bad(f"item {i}", problem)


def _parquet_batches(path: str, text_field: str) -> Iterator[pa.Array]:
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if text_field not in names:
        raise _NoColumn(text_field, names)
    for batch in file.iter_batches(batch_size=65536, columns=[text_field]):
        yield batch.column(0)


def _arrow_batches(path: str, text_field: str) -> Iterator[pa.Array]:
    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    names = reader.schema.names
    if text_field not in names:
        raise _NoColumn(text_field, names)
    index = names.index(text_field)
    for batch in batches:
        yield batch.column(index)


class _NoColumn(Exception):
    def __init__(self, text_field: str, names: list[str]) -> None:
        super().__init__(f"has no column {text_field!r} (its columns: {', '.join(names)})")


def _scan_table(scan: FileScan, columns: Iterator[pa.Array], head: int | None) -> None:
    try:
        for column in columns:
            if head is not None:
                column = column.slice(0, head - scan.documents)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                scan.fatal = f"has a column {scan.text_field!r} of {column.type}, not of strings"
                return
            try:
                column.validate(full=True)
            except pa.ArrowInvalid as e:
                scan.fatal = f"has a column {scan.text_field!r} that is not valid UTF-8 ({e})"
                return
            # blank: empty, or nothing but whitespace (utf8_is_space is false for "")
            blank = pc.or_(pc.utf8_is_space(column), pc.equal(pc.binary_length(column), 0))
            bad = pc.fill_null(blank, True)
            if pc.any(bad).as_py():
                for i in pc.indices_nonzero(bad).to_pylist():
                    what = "no value in" if not column[i].is_valid else "a blank"
                    where = f"row index {scan.documents + i}"
                    scan.note_bad(where, f"has {what} field {scan.text_field!r}")
            scan.documents += len(column)
            if head is not None and scan.documents >= head:
                return
    except _NoColumn as e:
        scan.fatal = str(e)


@dataclass(frozen=True)
class FileTask:
    """One local file to scan, with the source it belongs to."""

    path: str
    text_field: str
    source: str
    """The config entry, for messages."""
    size: int


def file_tasks(entries: list[tuple[str, str, str]]) -> list[FileTask]:
    """Every local file of `entries` ((path, text_field, label) per source), largest first
    (the order the scan is shared out in)."""
    tasks = [
        FileTask(f, text_field, label, os.path.getsize(f))
        for path, text_field, label in entries
        for f in local_files(path)
    ]
    return sorted(tasks, key=lambda t: (-t.size, t.path))


def share(tasks: list[FileTask], rank: int, world_size: int) -> list[FileTask]:
    """This rank's files: each next-largest file to the least-loaded rank (every rank computes
    the same split from the same file sizes)."""
    load = [0] * world_size
    mine = []
    for t in tasks:
        r = min(range(world_size), key=lambda k: (load[k], k))
        load[r] += t.size + 1
        if r == rank:
            mine.append(t)
    return mine


def check_scans(scans: list[FileScan], on_bad_document: str) -> list[str]:
    """Raise ConfigError for the first file that cannot be used; return the WARNINGs for the
    documents that will be skipped."""
    warnings = []
    for s in sorted(scans, key=lambda s: (s.source, s.path)):
        where = f"data file {s.path} ({s.source})"
        if s.fatal:
            fix = (
                "point text_field at the column that holds the text"
                if "column" in s.fatal
                else ("repair or remove it")
            )
            raise ConfigError(f"{where} {s.fatal}. Fix: {fix}.")
        examples = "; ".join(s.examples)
        if s.bad and on_bad_document != "skip":
            raise ConfigError(
                f"{where}: {s.bad} of {s.documents} documents have no usable text: {examples}. "
                "Fix: repair them, point text_field at the field that holds the text, or set "
                '[data] on_bad_document = "skip" to skip such documents.'
            )
        if s.bad and s.usable == 0:
            raise ConfigError(
                f"{where}: none of its {s.documents} documents has a usable text: {examples}. "
                "Fix: point text_field at the field that holds the text."
            )
        if s.bad:
            warnings.append(
                f"{where}: {s.bad} of {s.documents} documents have no usable text and will be "
                f"skipped (on_bad_document = 'skip'): {examples}"
            )
    return warnings
