"""Document sources: local jsonl/parquet/arrow files read by blocks, or HF hub datasets streamed;
sharded, tokenized on the fly, resumable.

Every document is checked as it is read (a usable text field, see data/validate.py): a bad one is
a `BadDocumentError` naming the source and its position, or, with `[data] on_bad_document =
"skip"`, skipped and counted (`skipped`, kept in the state, so a resumed run counts on). Local
files are normally scanned before training, so the reader meets bad documents only from hub
sources or with `[data] validate` off.

Local sources (`LocalDocumentSource`) are read by blocks (data/blocks.py), so that their position
does not depend on the layout: in epoch e the blocks come in a fixed order (file order in epoch
0, a seeded shuffle after), reader s of S takes every S-th block from the s-th, and reads each
block's documents in order. Its state is the epoch, the (block, next document) list it has left,
and the global `base` a reshard handed it (data/position.py): the blocks of each open epoch
already done or partly read when the layout changed. Hub sources (`HFDocumentSource`) use HF's
`split_dataset_by_node` and HF's streaming position; they resume on the same layout only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from trinity_titan.data.blocks import BlockedFiles
from trinity_titan.data.validate import FORMATS, BadDocumentError, document_problem, local_files
from trinity_titan.job_config import ConfigError

_LOGGED_SKIPS = 10
"""Skipped documents each reader names in a WARNING; after that every 1000th."""

Address = tuple[int, int, int]
"""A local document's place: (epoch, block, index in block)."""

EpochBase = dict[str, Any]
"""What a reshard found of one epoch: {"done": [blocks], "partial": {block: next document}}."""


@dataclass
class SourceSpec:
    """One `[[data.sources]]` entry."""

    path: str
    """Local file, directory or glob (jsonl/json, parquet, arrow), or an HF hub dataset name."""
    name: str | None = None
    """Hub dataset configuration (e.g. 'en' for allenai/c4)."""
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0
    """Mixture weight when no phases are configured."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceSpec:
        unknown = set(d) - {"path", "name", "split", "text_field", "weight"}
        if unknown or "path" not in d:
            raise ConfigError(
                f"[[data.sources]] entry {d}: needs a path; unknown keys {sorted(unknown)}. Fix: "
                "use path, name, split, text_field and weight"
            )
        return cls(
            path=str(d["path"]),
            name=d.get("name"),
            split=str(d.get("split", "train")),
            text_field=str(d.get("text_field", "text")),
            weight=float(d.get("weight", 1.0)),
        )


def local_corpus(
    spec: SourceSpec, jsonl_block_bytes: int, table_block_rows: int
) -> BlockedFiles | None:
    """The blocks of a local source (None: `spec.path` names a hub dataset)."""
    files = local_files(spec.path)
    if not files:
        return None
    kinds = {FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(
            f"[[data.sources]] path = {spec.path!r} matches files of several or unknown "
            f"formats. Fix: point it at files of one of {', '.join(sorted(FORMATS))}."
        )
    return BlockedFiles(files, spec.text_field, jsonl_block_bytes, table_block_rows)


def encode(tokenizer: BaseTokenizer, text: str, where: str) -> np.ndarray:
    """BOS text EOS as int32 token ids; a tokenizer failure names the document."""
    try:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    except Exception as e:  # noqa: BLE001 - name the document, not only the tokenizer
        raise BadDocumentError(f"{where} cannot be tokenized ({type(e).__name__}: {e})") from None
    return np.asarray(ids, np.int32)


def skip_or_raise(where: str, problem: str, skip_bad: bool, skipped: int) -> int:
    """A document without a usable text: BadDocumentError, or (`skip_bad`) the new count of
    skipped documents, the first ones and every 1000th named in a WARNING."""
    if not skip_bad:
        raise BadDocumentError(
            f"{where} {problem}. Fix: point text_field at the field that holds the text, or set "
            '[data] on_bad_document = "skip".'
        )
    skipped += 1
    if skipped <= _LOGGED_SKIPS or skipped % 1000 == 0:
        logger.warning(f"Skipped {where}: it {problem} ({skipped} so far)")
    return skipped


def epoch_order(num_blocks: int, seed: list[int], epoch: int) -> list[int]:
    """The block order of an epoch: file order first, then a seeded shuffle per epoch."""
    if epoch == 0:
        return list(range(num_blocks))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*seed, epoch])))
    return rng.permutation(num_blocks).tolist()


def assignment(
    num_blocks: int,
    seed: list[int],
    epoch: int,
    base: EpochBase | None,
    shard: int,
    num_shards: int,
) -> list[list[int]]:
    """Reader `shard`'s [block, first document] list in `epoch`: every `num_shards`-th of the
    blocks not done, in the epoch's order, each from where a reshard found it."""
    done = set(base["done"]) if base else set()
    partial = base["partial"] if base else {}
    left = [b for b in epoch_order(num_blocks, seed, epoch) if b not in done]
    return [[b, int(partial.get(b, 0))] for b in left[shard::num_shards]]


class LocalDocumentSource:
    """Tokenized documents (BOS ... EOS) of one reader's share of a local source's blocks;
    a new epoch at the end if `infinite`. `skip_bad`: skip and count documents without a usable
    text instead of raising BadDocumentError. `seed` orders the blocks of later epochs."""

    def __init__(
        self,
        spec: SourceSpec,
        corpus: BlockedFiles,
        tokenizer: BaseTokenizer,
        shard_index: int,
        num_shards: int,
        infinite: bool,
        skip_bad: bool = False,
        seed: tuple[int, ...] = (0,),
    ):
        self.spec = spec
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.shard, self.num_shards = shard_index, num_shards
        self.infinite = infinite
        self.skip_bad = skip_bad
        self.seed = list(seed)
        self.epoch = 0
        self.base: dict[int, EpochBase] = {}
        self.queue = self._assignment(0)
        self.exhausted = False
        self.docs = self.tokens = self.skipped = 0
        """Documents handed out, their tokens, documents skipped (this reader, all epochs)."""
        self.before: dict[str, int] = {"docs": 0, "tokens": 0, "skipped": 0}
        """The same counts of all readers before the last reshard (equal in every reader)."""
        self._records: list[Any] | None = None  # the documents of queue[0][0]
        self._fetched: tuple[int, list[Any]] | None = None  # the block fetch() read last

    def _assignment(self, epoch: int) -> list[list[int]]:
        return assignment(
            len(self.corpus), self.seed, epoch, self.base.get(epoch), self.shard, self.num_shards
        )

    def _where(self, block: int, index: int) -> str:
        return f"data source {self.spec.path!r}: {self.corpus.where(block, index)}"

    def next(self) -> tuple[np.ndarray, Address]:
        restarted = usable = False
        while True:
            if not self.queue:
                if not self.infinite or self.exhausted:
                    self.exhausted = True
                    raise StopIteration
                if restarted and not usable:
                    raise RuntimeError(
                        f"data source {self.spec.path} has no usable documents in the blocks "
                        f"of reader {self.shard + 1} of {self.num_shards}"
                    )
                self.epoch += 1
                self.base.pop(self.epoch - 1, None)
                self.queue, restarted = self._assignment(self.epoch), True
                continue
            block, index = self.queue[0]
            if self._records is None:
                self._records = self.corpus.records(block)
            if index >= len(self._records):
                self.queue.pop(0)
                self._records = None
                continue
            self.queue[0][1] = index + 1
            doc = self._records[index]
            problem = document_problem(doc, self.spec.text_field)
            if problem is None:
                usable = True
                tokens = encode(
                    self.tokenizer, doc[self.spec.text_field], self._where(block, index)
                )
                self.docs += 1
                self.tokens += len(tokens)
                return tokens, (self.epoch, block, index)
            self.skipped = skip_or_raise(
                self._where(block, index), problem, self.skip_bad, self.skipped
            )

    def fetch(self, address: Address) -> np.ndarray:
        """The tokens of the document at `address` (to rebuild a buffer on resume)."""
        _, block, index = address
        if self._fetched is None or self._fetched[0] != block:
            self._fetched = (block, self.corpus.records(block))
        doc = self._fetched[1][index]
        return encode(self.tokenizer, doc[self.spec.text_field], self._where(block, index))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "num_blocks": len(self.corpus),
            "seed": list(self.seed),
            "epoch": self.epoch,
            "queue": [list(q) for q in self.queue],
            "base": {
                e: {"done": list(b["done"]), "partial": dict(b["partial"])}
                for e, b in self.base.items()
            },  # fmt: skip
            "exhausted": self.exhausted,
            "docs": self.docs,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "before": dict(self.before),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "local" or state["num_blocks"] != len(self.corpus):
            raise ConfigError(
                f"data source {self.spec.path!r}: the checkpoint holds the position of a hub "
                "dataset, of other files or of another [data] jsonl_block_bytes. Fix: resume "
                "with the sources and block size it was saved with."
            )
        self.epoch = int(state["epoch"])
        self.queue = [list(map(int, q)) for q in state["queue"]]
        self.base = {int(e): b for e, b in state["base"].items()}
        self.exhausted = bool(state["exhausted"])
        self.docs, self.tokens = int(state["docs"]), int(state["tokens"])
        self.skipped = int(state["skipped"])
        self.before = dict(state["before"])
        self._records = None


class HFDocumentSource:
    """Tokenized documents (BOS ... EOS) of one shard of an HF hub dataset; restarts each epoch
    if `infinite` (HF reshuffles the file order per epoch, deterministically). `skip_bad`: skip
    and count documents without a usable text instead of raising BadDocumentError. Its documents
    have no address: a buffer keeps their tokens in the state."""

    def __init__(
        self,
        spec: SourceSpec,
        tokenizer: BaseTokenizer,
        shard_index: int,
        num_shards: int,
        infinite: bool,
        skip_bad: bool = False,
    ):
        self.spec = spec
        self.tokenizer = tokenizer
        self.infinite = infinite
        self.skip_bad = skip_bad
        self.shard = f"shard {shard_index + 1} of {num_shards}"
        ds = load_dataset(spec.path, spec.name, split=spec.split, streaming=True)
        if num_shards > 1:
            ds = split_dataset_by_node(ds, rank=shard_index, world_size=num_shards)
        self.ds = ds
        self._it = None
        self._pending: dict[str, Any] | None = None
        self.epoch = 0
        self.position = 0
        """Documents of this shard read in this epoch."""
        self.skipped = 0
        """Documents skipped so far (all epochs)."""
        self.docs = self.tokens = 0
        """Documents handed out and their tokens (all epochs)."""

    def _start(self) -> None:
        self.ds.set_epoch(self.epoch)
        if self._pending is not None:
            self.ds.load_state_dict(self._pending)
            self._pending = None
        self._it = self.ds.iter(batch_size=1)

    def _where(self) -> str:
        return (
            f"data source {self.spec.path!r} ({self.shard}, epoch {self.epoch}): document "
            f"{self.position}"
        )

    def next(self) -> tuple[np.ndarray, None]:
        restarted = usable = False
        while True:
            if self._it is None:
                self._start()
            try:
                row = next(self._it)
            except StopIteration:
                if not self.infinite:
                    raise
                if restarted and not usable:
                    raise RuntimeError(
                        f"data source {self.spec.path} has no usable documents in its {self.shard}"
                    ) from None
                self.epoch, self.position, self._it, restarted = self.epoch + 1, 0, None, True
                continue
            except Exception as e:  # noqa: BLE001 - the HF/Arrow reader's own errors
                self.position += 1
                raise BadDocumentError(
                    f"{self._where()} cannot be read ({type(e).__name__}: {e}). Fix: repair "
                    'the source, or check it before training with [data] validate = "full" '
                    "(local files)."
                ) from None
            self.position += 1
            doc = {k: v[0] for k, v in row.items()}
            problem = document_problem(doc, self.spec.text_field)
            if problem is None:
                usable = True
                tokens = encode(self.tokenizer, doc[self.spec.text_field], self._where())
                self.docs += 1
                self.tokens += len(tokens)
                return tokens, None
            self.skipped = skip_or_raise(self._where(), problem, self.skip_bad, self.skipped)

    def state_dict(self) -> dict[str, Any]:
        hf = self._pending if self._it is None else self.ds.state_dict()
        return {"kind": "hub", "epoch": self.epoch, "hf": hf, "position": self.position,
                "skipped": self.skipped, "docs": self.docs, "tokens": self.tokens}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._pending = state["hf"]
        self._it = None
        self.position = int(state["position"])
        self.skipped = int(state["skipped"])
        self.docs, self.tokens = int(state["docs"]), int(state["tokens"])
