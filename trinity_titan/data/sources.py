"""Document sources: HF datasets (local jsonl/parquet/arrow files or hub names), streamed,
sharded, tokenized on the fly, resumable.

Every document is checked as it is read (a usable text field, see data/validate.py): a bad one is
a `BadDocumentError` naming the source and its position, or, with `[data] on_bad_document =
"skip"`, skipped and counted (`skipped`, kept in the state, so a resumed run counts on). Local
files are normally scanned before training, so the reader meets bad documents only from hub
sources or with `[data] validate` off.

Each (data-parallel rank, dataloader worker) pair reads a disjoint shard: whole files when the
dataset has a multiple of `num_shards` files, else every `num_shards`-th example (HF's
`split_dataset_by_node`). Iteration goes through `IterableDataset.iter`, which, unlike `__iter__`,
does not re-split by torch worker on its own. The position is HF's own streaming state_dict (file
and offset), so resuming does not re-read what was consumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from trinity_titan.data.validate import FORMATS, BadDocumentError, document_problem, local_files
from trinity_titan.job_config import ConfigError

_LOGGED_SKIPS = 10
"""Skipped documents each reader names in a WARNING; after that every 1000th."""


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


def open_dataset(spec: SourceSpec) -> IterableDataset:
    """A streaming HF dataset for `spec`: local files by extension, else a hub name."""
    files = local_files(spec.path)
    if files:
        kinds = {FORMATS.get(os.path.splitext(f)[1]) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise ConfigError(
                f"[[data.sources]] path = {spec.path!r} matches files of several or unknown "
                f"formats. Fix: point it at files of one of {', '.join(sorted(FORMATS))}."
            )
        return load_dataset(kinds.pop(), data_files=files, split=spec.split, streaming=True)
    return load_dataset(spec.path, spec.name, split=spec.split, streaming=True)


class HFDocumentSource:
    """Tokenized documents (BOS ... EOS) of one shard of one HF dataset; restarts each epoch if
    `infinite` (HF reshuffles the file order per epoch, deterministically). `skip_bad`: skip and
    count documents without a usable text instead of raising BadDocumentError."""

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
        ds = open_dataset(spec)
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

    def next(self) -> np.ndarray:
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
                return self._encode(doc[self.spec.text_field])
            if not self.skip_bad:
                raise BadDocumentError(
                    f"{self._where()} {problem}. Fix: point text_field at the field that holds "
                    'the text, or set [data] on_bad_document = "skip".'
                )
            self.skipped += 1
            if self.skipped <= _LOGGED_SKIPS or self.skipped % 1000 == 0:
                logger.warning(f"Skipped {self._where()}: it {problem} ({self.skipped} so far)")

    def _encode(self, text: str) -> np.ndarray:
        try:
            ids = self.tokenizer.encode(text, add_bos=True, add_eos=True)
        except Exception as e:  # noqa: BLE001 - name the document, not only the tokenizer
            raise BadDocumentError(
                f"{self._where()} cannot be tokenized ({type(e).__name__}: {e})"
            ) from None
        return np.asarray(ids, np.int32)

    def state_dict(self) -> dict[str, Any]:
        hf = self._pending if self._it is None else self.ds.state_dict()
        return {"epoch": self.epoch, "hf": hf, "position": self.position, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._pending = state["hf"]
        self._it = None
        self.position = int(state.get("position", 0))  # absent in checkpoints before it
        self.skipped = int(state.get("skipped", 0))
