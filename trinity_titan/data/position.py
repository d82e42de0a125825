"""The global data position: the union of every reader's state, redistributed over a new layout.

A reader is one (data-parallel rank, dataloader worker) pair; reader s of S reads its share of
each local source (data/sources.py). At a change of layout (another number of ranks or workers)
the saved readers' states are merged into what is global, then cut anew for S' readers:

- per source and open epoch, the blocks done and those partly read (with their next document):
  each new reader continues the blocks not done, every S'-th in the epoch's order, each from its
  next document; a later epoch follows the same rule, so nothing is read twice or skipped;
- the open documents (RSDB buffers, sequential carry-over), with their read heads: dealt round
  robin, in address order, to the new readers, which continue each from its head;
- the training tokens emitted (the mixture phase): their sum becomes the base count of the new
  generation; documents, tokens and skips read so far are kept for `data_position`.

The mixture and RSDB RNGs start afresh, seeded with the generation and the new reader. Hub
sources have no layout-free position and cannot be resharded (training/checkpoint_select.py
refuses that before the model is built).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trinity_titan.data.sources import assignment
from trinity_titan.job_config import ConfigError

ReaderState = dict[str, Any]
"""A `PackedDocumentStream.state_dict()`."""


def _merge_source(
    readers: list[ReaderState], k: int
) -> tuple[int, dict[int, dict[str, Any]], dict[str, Any]]:
    """(the lowest open epoch, the merged epochs of source `k`, the new shared part of its state).

    The lowest epoch's blocks not done are those still in the queues of the readers in it; a
    later epoch some readers have begun is described by what is done and partly read in it, and
    the shares the other readers have not begun follow from the previous reshard's record of it
    (`base`, kept by each reader for the epochs after its own)."""
    states = [r["mixture"]["sources"][k] for r in readers]
    first = states[0]
    if any(s.get("kind") != "local" for s in states):
        raise ConfigError(
            "the data position of a hub dataset source cannot be resharded. Fix: resume with "
            "the saved data-parallel degree and num_workers, or use local files."
        )
    nb, seed = first["num_blocks"], first["seed"]
    base: dict[int, dict[str, Any]] = {}
    for s in states:
        for e, b in s["base"].items():
            base.setdefault(int(e), b)
    lo = min(s["epoch"] for s in states)
    hi = max([s["epoch"] for s in states] + list(base))
    merged: dict[int, dict[str, Any]] = {}
    for e in range(lo, hi + 1):
        if e == lo:
            left = {b: start for s in states if s["epoch"] == lo for b, start in s["queue"]}
            done = {b for b in range(nb) if b not in left}
            partial = {b: start for b, start in left.items() if start > 0}
            merged[e] = {"done": sorted(done), "partial": partial}
            continue
        done = set(base.get(e, {}).get("done", []))
        partial = {}
        for r, s in zip(readers, states, strict=True):
            share = assignment(nb, seed, e, base.get(e), r["shard"], r["num_shards"])
            if s["epoch"] > e:
                done.update(b for b, _ in share)
            elif s["epoch"] == e:
                left = {b: start for b, start in s["queue"]}
                done.update(b for b, _ in share if b not in left)
                partial.update({b: start for b, start in left.items() if start > 0})
            else:
                partial.update({b: start for b, start in share if start > 0})
        merged[e] = {"done": sorted(done), "partial": partial}
    before = {
        key: first["before"][key] + sum(s[key] for s in states)
        for key in ("docs", "tokens", "skipped")
    }
    source = {"kind": "local", "num_blocks": nb, "seed": seed, "epoch": lo,
              "exhausted": False, "docs": 0, "tokens": 0, "skipped": 0, "before": before}  # fmt: skip
    return lo, merged, source


def _open_documents(readers: list[ReaderState]) -> list[tuple[tuple[int, ...], int]]:
    """Every open document of every reader as (address, head), in address order."""
    docs = []
    for r in readers:
        open_ = r["packer"]["open"]
        if open_["unread"]:
            raise ConfigError(
                "the data position holds documents of a hub dataset source, which cannot be "
                "resharded. Fix: resume with the saved data-parallel degree and num_workers."
            )
        docs += zip(map(tuple, open_["addresses"].tolist()), open_["heads"].tolist(), strict=True)
    return sorted(docs)


def reshard(readers: list[ReaderState], num_readers: int) -> dict[int, ReaderState]:
    """The states of `num_readers` new readers that continue the saved `readers` (all of the
    saved layout, in any order) exactly once; see the module docstring."""
    readers = sorted(readers, key=lambda r: r["shard"])
    if [r["shard"] for r in readers] != list(range(readers[0]["num_shards"])):
        raise ConfigError(
            f"the checkpoint's data position holds readers {[r['shard'] for r in readers]} of "
            f"{readers[0]['num_shards']}: it is incomplete and cannot be resharded"
        )
    num_sources = len(readers[0]["mixture"]["sources"])
    merged = [_merge_source(readers, k) for k in range(num_sources)]
    documents = _open_documents(readers)
    base_tokens = readers[0]["base_tokens"] + sum(r["tokens"] for r in readers)
    out = {}
    for shard in range(num_readers):
        sources = []
        for lo, epochs, source in merged:
            queue = assignment(
                source["num_blocks"], source["seed"], lo, epochs[lo], shard, num_readers
            )
            later = {e: b for e, b in epochs.items() if e > lo}  # small: epochs just begun
            sources.append({**source, "queue": queue, "base": later})
        mine = documents[shard::num_readers]
        open_ = {
            "addresses": np.asarray([a for a, _ in mine], np.int64).reshape(-1, 4),
            "heads": np.asarray([h for _, h in mine], np.int64),
            "order": np.zeros(len(mine), np.bool_),
            "unread": [],
        }
        out[shard] = {
            "shard": shard,
            "num_shards": num_readers,
            "generation": readers[0]["generation"] + 1,
            "base_tokens": base_tokens,
            "tokens": 0,
            "dropped_tail": sum(r["dropped_tail"] for r in readers),
            "mixture": {
                "rng": None,
                "exhausted": [False] * num_sources,
                "drawn": [0] * num_sources,
                "phase": max(r["mixture"]["phase"] for r in readers),
                "sources": sources,
            },
            "packer": {"open": open_, "rng": None, "exhausted": False},
        }
    return out


@dataclass
class SourcePosition:
    """Where a run is in one source."""

    documents: int = 0
    """Documents read from the source: trained on wholly, or open."""
    tokens: int = 0
    """Their tokens."""
    open_documents: int = 0
    """Of them, those in RSDB buffers or carried over, partly trained on (local sources)."""
    skipped: int = 0
    """Bad documents skipped (`on_bad_document = "skip"`)."""
    epochs: list[int] = field(default_factory=list)
    """The epoch each reader is in."""


@dataclass
class DataPosition:
    """Where a run is in its data (`trinity-data-position`)."""

    readers: int
    """Readers (data-parallel ranks x dataloader workers) it was saved with."""
    generation: int
    """Changes of layout so far."""
    tokens: int
    """Training tokens emitted by all readers (the count the phases follow)."""
    phase: int
    """The mixture phase (0-based)."""
    sources: list[SourcePosition]


def data_position(readers: list[ReaderState]) -> DataPosition:
    """Totals over the saved `readers` of one checkpoint."""
    first = readers[0]
    sources = []
    for k in range(len(first["mixture"]["sources"])):
        states = [r["mixture"]["sources"][k] for r in readers]
        before = states[0].get("before", {"docs": 0, "tokens": 0, "skipped": 0})
        open_documents = sum(
            int((r["packer"]["open"]["addresses"][:, 0] == k).sum()) for r in readers
        )
        sources.append(
            SourcePosition(
                documents=before["docs"] + sum(s["docs"] for s in states),
                tokens=before["tokens"] + sum(s["tokens"] for s in states),
                open_documents=open_documents,
                skipped=before["skipped"] + sum(s["skipped"] for s in states),
                epochs=[s["epoch"] for s in states],
            )
        )
    return DataPosition(
        readers=first["num_shards"],
        generation=first["generation"],
        tokens=first["base_tokens"] + sum(r["tokens"] for r in readers),
        phase=max(r["mixture"]["phase"] for r in readers),
        sources=sources,
    )
