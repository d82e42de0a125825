"""RSDB and sequential packing over finite in-memory corpora (no tokenizer, no files)."""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import numpy as np
import pytest

from trinity_titan.data.packing import OpenDocument, SequentialPacker
from trinity_titan.data.rsdb import RSDB


class ListDocs:
    """A resumable finite stream of documents (the role the mixture plays in the loader); the
    address of document i is (0, 0, 0, i)."""

    def __init__(self, docs: list[np.ndarray]):
        self.docs, self.pos = docs, 0

    def __call__(self) -> OpenDocument:
        if self.pos == len(self.docs):
            raise StopIteration
        self.pos += 1
        return OpenDocument(self.docs[self.pos - 1], (0, 0, 0, self.pos - 1))

    def fetch(self, address) -> np.ndarray:
        return self.docs[address[3]]


def corpus(n_docs: int = 300, long_docs: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Documents of unique, increasing token ids; a few are very long."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=n_docs)
    lengths[rng.choice(n_docs, long_docs, replace=False)] = 2000
    ends = np.cumsum(lengths)
    return [np.arange(e - n, e, dtype=np.int32) for n, e in zip(lengths, ends, strict=True)]


def drain(packer) -> list[np.ndarray]:
    return list(drain_iter(packer))


def drain_iter(packer):
    while True:
        try:
            yield packer.next_row()[0]
        except StopIteration:
            return


def make(kind: str, docs, row_len=33, buffer_docs=8, seed=0):
    stream = ListDocs(docs)
    packer = (
        RSDB(stream, row_len, buffer_docs, seed)
        if kind == "rsdb"
        else SequentialPacker(stream, row_len)
    )
    return packer, stream


@pytest.mark.parametrize("kind", ["rsdb", "sequential"])
def test_every_token_exactly_once_rows_full_docs_in_order(kind):
    docs = corpus()
    packer, _ = make(kind, docs)
    rows = drain(packer)
    assert all(len(r) == 33 for r in rows[:-1]) and 0 < len(rows[-1]) <= 33
    emitted = np.concatenate(rows)
    total = sum(len(d) for d in docs)
    assert len(emitted) == total and np.array_equal(np.sort(emitted), np.arange(total))
    # Read heads: each document's tokens come out in order, and inside a row a piece of a
    # document only ends at the document's last token (its EOS in real data) or at the row end.
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    last = {int(d[-1]) for d in docs}
    for i in range(len(docs)):
        assert np.all(np.diff(emitted[doc_of[emitted] == i]) > 0)
    for row in rows:
        switches = np.nonzero(np.diff(doc_of[row]))[0]
        assert all(int(row[s]) in last for s in switches)
    if kind == "sequential":
        assert np.array_equal(emitted, np.arange(total))


def test_same_seed_same_rows_other_seed_other_rows():
    docs = corpus()
    a = drain(make("rsdb", docs, seed=1)[0])
    b = drain(make("rsdb", docs, seed=1)[0])
    c = drain(make("rsdb", docs, seed=2)[0])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))


@pytest.mark.parametrize("kind", ["rsdb", "sequential"])
@pytest.mark.parametrize("cut", [1, 37, 150])
def test_resume_mid_stream_gives_identical_rows(kind, cut):
    docs = corpus()
    packer, stream = make(kind, docs, seed=3)
    for _ in range(cut):
        packer.next_row()
    state = copy.deepcopy((packer.state_dict(), stream.pos))
    rest = drain(packer)

    resumed, stream2 = make(kind, docs, seed=99)  # the seed comes back with the state
    resumed.load_state_dict(state[0], stream2.fetch)
    stream2.pos = state[1]
    again = drain(resumed)
    assert len(rest) == len(again) > 0
    assert all(np.array_equal(x, y) for x, y in zip(rest, again, strict=True))


def test_buffer_holds_2x_and_refills_in_bulk_at_configured_size():
    docs = corpus(n_docs=400)
    stream = ListDocs(docs)
    sizes_at_draw = []

    def next_doc():
        sizes_at_draw.append(len(rsdb))
        return stream()

    rsdb = RSDB(next_doc, 33, buffer_docs=10, seed=0)
    sizes = []
    for _ in drain_iter(rsdb):
        sizes.append(len(rsdb))
    assert max(sizes) <= 20 and max(sizes_at_draw) == 19
    for prev, cur in zip(sizes_at_draw, sizes_at_draw[1:], strict=False):
        # a draw either continues a bulk refill (one more doc than before) or starts one at <= 10
        assert cur == prev + 1 or cur <= 10, (prev, cur)


def test_pick_is_uniform_over_the_buffer():
    # Eight endless documents, rows of one piece each: every row picks one of the 8 uniformly.
    docs = [np.full(10**6, i, dtype=np.int32) for i in range(8)]
    rsdb, _ = make("rsdb", docs, row_len=16, buffer_docs=4, seed=5)
    counts = Counter(int(rsdb.next_row()[0][0]) for _ in range(8000))
    assert sorted(counts) == list(range(8))
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts


def batch_het_proxy(kind: str, seed: int = 0, ranks: int = 8, steps: int = 100):
    """(mean BatchHet proxy, mean distinct documents per row) with a few very long documents.

    Each of `ranks` data-parallel ranks streams its own shard (endless, repeating) of 2000 short
    documents (20-400 tokens, per-token 'loss' ~ N(3, 0.3)) and 4 very long ones (40k tokens, loss
    1 or 5: code, tables, ...). A step takes one micro-batch of 4 rows of 256 tokens per rank; its
    loss is the mean over its tokens; BatchHet = max - mean over the step's micro-batches,
    averaged over steps. RSDB buffers 64 documents (holds up to 128).
    """
    packers, losses = [], []
    for rank in range(ranks):
        rng = np.random.default_rng([seed, rank])
        lengths = rng.integers(20, 400, size=2000)
        long = rng.choice(len(lengths), 4, replace=False)
        lengths[long] = 40_000
        loss = rng.normal(3.0, 0.3, size=len(lengths))
        loss[long] = rng.choice([1.0, 5.0], size=len(long))
        ids = itertools.cycle(range(len(lengths)))

        def next_doc(ids=ids, lengths=lengths):
            i = next(ids)
            return OpenDocument(np.full(lengths[i], i, dtype=np.int32))  # token = its doc's id

        packers.append(RSDB(next_doc, 257, 64, [seed, rank]) if kind == "rsdb"
                       else SequentialPacker(next_doc, 257))  # fmt: skip
        losses.append(loss)
    hets, docs_per_row = [], []
    for _ in range(steps):
        micro = []
        for packer, loss in zip(packers, losses, strict=True):
            rows = [packer.next_row()[0] for _ in range(4)]
            micro.append(loss[np.concatenate(rows)].mean())
            docs_per_row += [len(np.unique(r)) for r in rows]
        hets.append(max(micro) - np.mean(micro))
    return float(np.mean(hets)), float(np.mean(docs_per_row))


def test_rsdb_lowers_batch_heterogeneity():
    seq_het, seq_div = batch_het_proxy("sequential")
    rsdb_het, rsdb_div = batch_het_proxy("rsdb")
    print(f"\nBatchHet proxy: sequential {seq_het:.4f}, RSDB {rsdb_het:.4f} "
          f"({seq_het / rsdb_het:.2f}x lower); docs per row: sequential {seq_div:.2f}, "
          f"RSDB {rsdb_div:.2f}")  # fmt: skip
    assert rsdb_het < seq_het / 2
