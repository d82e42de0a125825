"""The data position across a change of layout: every token of every document exactly once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures import debug_job_config, debug_tokenizer, write_corpora
from trinity_titan.data.loader import PackedDocumentStream, build_data_dataloader
from trinity_titan.data.mixture import PhaseSchedule
from trinity_titan.data.position import data_position, reshard
from trinity_titan.data.sources import LocalDocumentSource, SourceSpec, local_corpus
from trinity_titan.data.trace import TRACE_KEY, trace_pieces
from trinity_titan.job_config import ConfigError

SEQ = 24


def _sources(tmp_path, infinite: bool):
    jsonl, parquet, _ = write_corpora(tmp_path)
    tok = debug_tokenizer()
    specs = [SourceSpec(path=jsonl), SourceSpec(path=parquet, text_field="content")]
    corpora = [local_corpus(s, jsonl_block_bytes=300, table_block_rows=3) for s in specs]

    def make(shard, num_shards, infinite=infinite):
        return [
            LocalDocumentSource(spec, corpus, tok, shard, num_shards, infinite, seed=(7, k))
            for k, (spec, corpus) in enumerate(zip(specs, corpora, strict=True))
        ]

    # every document's tokens, by (source, block, index): what the trace must point into
    truth = {}
    for k, s in enumerate(make(0, 1, infinite=False)):
        while True:
            try:
                tokens, (_, block, index) = s.next()
            except StopIteration:
                break
            truth[(k, block, index)] = tokens
    return make, truth


def _stream(make, mixing, rank, world, trace=True):
    schedule = PhaseSchedule([300, 1], [[1.0, 0.0], [0.5, 0.5]])  # two phases
    return PackedDocumentStream(make, schedule, SEQ, mixing, rsdb_buffer_docs=6, seed=5,
                                dp_rank=rank, dp_world_size=world, trace_rows=trace)  # fmt: skip


def _take(stream, it, n, pieces, truth):
    """Up to `n` rows of `it`; check each row against the documents its trace names."""
    for _ in range(n):
        try:
            x, y = next(it)
        except StopIteration:
            return
        row = torch.cat([x["input"], y[-1:]]).numpy()
        at = 0
        for src, epoch, block, index, start, end in trace_pieces(x[TRACE_KEY][None])[0]:
            doc = truth[(src, block, index)]
            assert np.array_equal(row[at : at + end - start], doc[start:end])
            at += end - start
            pieces.append(((src, epoch, block, index), start, end))
        assert at == len(row)


def _check_exactly_once(pieces, truth, dropped):
    by_doc: dict = {}
    for address, start, end in pieces:
        by_doc.setdefault(address, []).append((start, end))
    covered = 0
    for address, spans in by_doc.items():
        spans.sort()
        pos = 0
        for start, end in spans:
            assert start == pos, (address, spans)  # no gap, no overlap
            pos = end
        covered += pos
    total = sum(len(t) for t in truth.values())
    assert covered + dropped == total, (covered, dropped, total)
    assert {(a[0], a[2], a[3]) for a in by_doc} <= set(truth)


@pytest.mark.parametrize("mixing", ["rsdb", "sequential"])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 4), (3, 2), (1, 3)])
def test_reshard_trains_every_token_of_a_finite_corpus_exactly_once(
    tmp_path, mixing, before, after
):
    make, truth = _sources(tmp_path, infinite=False)
    pieces: list = []
    old = [_stream(make, mixing, r, before) for r in range(before)]
    iters = [iter(s) for s in old]
    for s, it in zip(old, iters, strict=True):
        _take(s, it, 7, pieces, truth)
    saved = [s.state_dict() for s in old]
    position = data_position(saved)
    assert position.tokens == 7 * SEQ * before and position.readers == before
    assert sum(p.documents for p in position.sources) > 0

    new_states = reshard(saved, after)
    assert all(s["base_tokens"] == 7 * SEQ * before for s in new_states.values())
    new = [_stream(make, mixing, r, after) for r in range(after)]
    dropped = 0
    for r, s in enumerate(new):
        s.resume_readers({r: new_states[r]})
        _take(s, iter(s), 10_000, pieces, truth)
        dropped += s.dropped_tail
    _check_exactly_once(pieces, truth, dropped)


def test_two_reshards_in_a_row_and_later_epochs(tmp_path):
    """Endless sources: 2 -> 3 -> 1 readers over several epochs; within each epoch no document
    is read twice, and the position keeps the totals."""
    make, truth = _sources(tmp_path, infinite=True)
    pieces: list = []
    streams = [_stream(make, "rsdb", r, 2) for r in range(2)]
    for s in streams:
        _take(s, iter(s), 20, pieces, truth)
    states = [s.state_dict() for s in streams]
    for after in (3, 1):
        new = reshard(states, after)
        streams = [_stream(make, "rsdb", r, after) for r in range(after)]
        for r, s in enumerate(streams):
            s.resume_readers({r: new[r]})
            _take(s, iter(s), 80, pieces, truth)
        states = [s.state_dict() for s in streams]
    position = data_position(states)
    assert position.generation == 2 and position.tokens == (2 * 20 + 3 * 80 + 80) * SEQ
    assert max(max(p.epochs) for p in position.sources) >= 2  # several epochs were read
    spans: dict = {}
    for address, start, end in pieces:
        spans.setdefault(address, []).append((start, end))
    for address, s in spans.items():  # (source, epoch, block, index): once per epoch
        s.sort()
        assert all(a[1] <= b[0] for a, b in zip(s, s[1:], strict=False)), (address, s)
    docs = sum(p.documents for p in position.sources)
    assert docs >= len({a for a in spans})


def test_a_hub_position_is_not_resharded(tmp_path):
    make, truth = _sources(tmp_path, infinite=False)
    s = _stream(make, "rsdb", 0, 1)
    _take(s, iter(s), 2, [], truth)
    state = s.state_dict()
    state["mixture"]["sources"][0]["kind"] = "hub"
    with pytest.raises(ConfigError, match="hub dataset source cannot be resharded"):
        reshard([state], 2)


def _loader_config(tmp_path, workers: int):
    jsonl, parquet, _ = write_corpora(tmp_path)
    cfg = debug_job_config(
        "--training.seq_len", str(SEQ),
        "--training.local_batch_size", "2",
        "--training.dataloader.num_workers", str(workers),
    )  # fmt: skip
    cfg.data.sources = [{"path": jsonl}, {"path": parquet, "text_field": "content"}]
    cfg.data.phases = [{"tokens": 200, "weights": [1.0, 0.0]}, {"tokens": 1, "weights": [1, 3]}]
    cfg.data.rsdb_buffer_docs = 8
    cfg.data.jsonl_block_bytes = 300
    cfg.data.table_block_rows = 3
    cfg.data.infinite = False
    cfg.data.trace_rows = True
    return cfg


@pytest.mark.parametrize(("workers_before", "workers_after"), [(0, 2), (2, 0)])
def test_the_dataloader_reshards_ranks_and_workers(tmp_path, workers_before, workers_after):
    """2 ranks -> 1 rank, and the number of workers changes: the saved states of both ranks go
    into the new rank's workers; the whole corpus is then trained on exactly once."""
    tok = debug_tokenizer()
    _, truth = _sources(tmp_path, infinite=False)
    pieces: list = []

    def take(loader_iter, n):
        for _ in range(n):
            try:
                x, y = next(loader_iter)
            except StopIteration:
                return
            for row in trace_pieces(x[TRACE_KEY]):
                pieces.extend(((a, b, c, d), s, e) for a, b, c, d, s, e in row)

    cfg = _loader_config(tmp_path, workers_before)
    saved = {}
    for rank in range(2):
        loader = build_data_dataloader(2, rank, tok, cfg, trace_rows=True)
        it = iter(loader)
        take(it, 3)
        saved.update(loader.state_dict())
    assert saved["world_size"] == 2 and saved["global_batch_size"] == 4
    cfg_after = _loader_config(tmp_path, workers_after)
    resumed = build_data_dataloader(1, 0, tok, cfg_after, trace_rows=True)
    resumed.expect_resume(sorted(saved))
    assert set(resumed.state_dict()) == set(saved)  # the template names every saved key
    resumed.load_state_dict(saved)
    take(iter(resumed), 10_000)
    covered = sum(e - s for _, s, e in pieces)
    total = sum(len(t) for t in truth.values())
    assert len(set(pieces)) == len(pieces)
    # every reader drops at most its last, short row
    assert total - (2 * max(1, workers_before) + max(1, workers_after)) * (SEQ + 1) < covered
    assert covered <= total


def test_the_debug_loader_resumes_on_another_data_parallel_degree():
    """The debug loader's rows do not depend on the degree: 2 ranks -> 1 rank continues the
    global batches of an uninterrupted run."""
    tok = debug_tokenizer()
    cfg2 = debug_job_config("--training.local_batch_size", "2", "--training.seq_len", "32")
    cfg1 = debug_job_config("--training.local_batch_size", "4", "--training.seq_len", "32")
    straight = iter(build_data_dataloader(1, 0, tok, cfg1))
    expected = [next(straight)[0]["input"] for _ in range(5)]
    saved = {}
    for rank in range(2):
        loader = build_data_dataloader(2, rank, tok, cfg2)
        it = iter(loader)
        for _ in range(3):
            next(it)
        saved.update(loader.state_dict())
    resumed = build_data_dataloader(1, 0, tok, cfg1)
    resumed.load_state_dict(saved)
    it = iter(resumed)
    for want in expected[3:]:
        assert torch.equal(next(it)[0]["input"], want)
