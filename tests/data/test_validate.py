"""The corpus check: each kind of bad document is named by file and line (or row); the reader
skips and counts what `on_bad_document = "skip"` allows, and names the source otherwise."""

from __future__ import annotations

import json
import os
import time

import pytest
from datasets import Dataset

from tests.fixtures import debug_tokenizer, write_corpora
from trinity_titan.data.sources import LocalDocumentSource, SourceSpec, local_corpus
from trinity_titan.data.validate import (
    BadDocumentError,
    FileTask,
    check_scans,
    scan_file,
    share,
)
from trinity_titan.job_config import ConfigError


def _jsonl(path, *lines: str):
    path.write_bytes(b"".join(line.encode() if isinstance(line, str) else line for line in lines))
    return str(path)


def test_clean_files_of_every_format(tmp_path):
    jsonl, parquet, arrow = write_corpora(tmp_path)
    assert scan_file(jsonl, "text").documents == 50
    assert scan_file(parquet, "content").documents == 30
    arrow_file = next(f for f in os.listdir(arrow) if f.endswith(".arrow"))
    scan = scan_file(os.path.join(arrow, arrow_file), "text")
    assert (scan.documents, scan.bad, scan.fatal) == (10, 0, None)


def test_jsonl_problems_name_the_line(tmp_path):
    ok = '{"text": "a b"}\n'
    bad = scan_file(_jsonl(tmp_path / "a.jsonl", ok, "\n", '{"body": "x"}\n', '{"text": "  "}\n',
                           '{"text": 3}\n', "[1, 2]\n", ok), "text")  # fmt: skip
    assert (bad.documents, bad.bad, bad.fatal) == (6, 4, None)
    assert bad.examples == [
        "line 3 has no field 'text'",
        "line 4 has a blank field 'text'",
        "line 5 has a field 'text' of type int, not a string",
    ]
    broken = scan_file(_jsonl(tmp_path / "b.jsonl", ok, '{"text": "a"\n', ok), "text")
    assert broken.fatal == "line 2 is not valid JSON (Expecting ',' delimiter at column 14)"
    utf = scan_file(_jsonl(tmp_path / "c.jsonl", ok, b'{"text": "\xff"}\n'), "text")
    assert utf.fatal.startswith("line 2 is not valid UTF-8")
    assert (
        scan_file(_jsonl(tmp_path / "d.jsonl"), "text").fatal == "holds no documents (it is empty)"
    )
    array = tmp_path / "e.json"
    array.write_text(json.dumps([{"text": "a"}, {"txt": "b"}]))
    assert scan_file(str(array), "text").examples == ["item 1 has no field 'text'"]
    head = scan_file(_jsonl(tmp_path / "f.jsonl", ok, ok, '{"body": "x"}\n'), "text", head=2)
    assert (head.documents, head.bad) == (2, 0)


def test_table_problems_name_the_row(tmp_path):
    path = str(tmp_path / "t.parquet")
    Dataset.from_dict({"content": ["a", None, " ", "b"]}).to_parquet(path)
    scan = scan_file(path, "content")
    assert scan.examples == [
        "row index 1 has no value in field 'content'",
        "row index 2 has a blank field 'content'",
    ]
    assert scan_file(path, "text").fatal == "has no column 'text' (its columns: content)"
    ints = str(tmp_path / "i.parquet")
    Dataset.from_dict({"content": [1, 2]}).to_parquet(ints)
    assert scan_file(ints, "content").fatal == "has a column 'content' of int64, not of strings"


def test_skip_mode_counts_and_error_mode_stops(tmp_path):
    scan = scan_file(_jsonl(tmp_path / "a.jsonl", '{"text": "a"}\n', '{"x": 1}\n'), "text",
                     source="[[data.sources]] entry 0")  # fmt: skip
    with pytest.raises(ConfigError, match=r"a.jsonl \(\[\[data.sources\]\] entry 0\): 1 of 2 "
                       r"documents have no usable text: line 2 has no field 'text'.*skip"):  # fmt: skip
        check_scans([scan], "error")
    assert "will be skipped" in check_scans([scan], "skip")[0]
    useless = scan_file(_jsonl(tmp_path / "b.jsonl", '{"x": 1}\n'), "text")
    with pytest.raises(ConfigError, match="none of its 1 documents"):
        check_scans([useless], "skip")
    broken = scan_file(_jsonl(tmp_path / "c.jsonl", "{\n"), "text")
    with pytest.raises(ConfigError, match="line 1 is not valid JSON"):
        check_scans([broken], "skip")  # skipping cannot get past a broken line


def test_the_files_are_shared_out_by_size():
    tasks = [FileTask(f"f{i}", "text", "s", size) for i, size in enumerate([90, 50, 40, 30, 10])]
    parts = [share(tasks, r, 2) for r in range(2)]
    assert sorted(t.path for p in parts for t in p) == sorted(t.path for t in tasks)
    loads = [sum(t.size for t in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 30  # within the smallest-but-one file


def test_the_reader_skips_counts_and_resumes_or_names_the_document(tmp_path):
    lines = ['{"text": "one"}\n', '{"body": "x"}\n', '{"text": "two"}\n', '{"text": ""}\n',
             '{"text": "three"}\n']  # fmt: skip
    spec = SourceSpec(path=_jsonl(tmp_path / "a.jsonl", *lines))
    corpus = local_corpus(spec, jsonl_block_bytes=1 << 20, table_block_rows=1024)
    tok = debug_tokenizer()
    reader = LocalDocumentSource(spec, corpus, tok, 0, 1, infinite=False, skip_bad=True)
    reader.next(), reader.next()
    assert reader.skipped == 1 and reader.docs == 2
    state = reader.state_dict()
    resumed = LocalDocumentSource(spec, corpus, tok, 0, 1, infinite=False, skip_bad=True)
    resumed.load_state_dict(state)
    tokens, address = resumed.next()
    assert tok.decode(tokens.tolist()[1:-1]) == "three" and address == (0, 0, 4)
    assert resumed.skipped == 2

    strict = LocalDocumentSource(spec, corpus, tok, 0, 1, infinite=False)
    strict.next()
    with pytest.raises(BadDocumentError, match=r"a.jsonl \(block 0, document 1 of the block\) "
                       r"has no field 'text'.*on_bad_document"):  # fmt: skip
        strict.next()


def test_scan_speed_on_a_jsonl_corpus(tmp_path):
    """The full scan reads well over 10k documents/s on one core (docs/benchmarks.md)."""
    doc = json.dumps({"text": "lorem ipsum dolor sit amet " * 40, "id": 1}) + "\n"
    path = _jsonl(tmp_path / "big.jsonl", doc * 20_000)
    start = time.perf_counter()
    scan = scan_file(path, "text")
    rate = scan.documents / (time.perf_counter() - start)
    assert scan.documents == 20_000 and rate > 10_000, rate
