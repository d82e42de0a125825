"""Document sources: HF datasets (local jsonl/parquet/arrow files or hub names), streamed,
sharded, tokenized on the fly, resumable.

Each (data-parallel rank, dataloader worker) pair reads a disjoint shard: whole files when the
dataset has a multiple of `num_shards` files, else every `num_shards`-th example (HF's
`split_dataset_by_node`). Iteration goes through `IterableDataset.iter`, which, unlike `__iter__`,
does not re-split by torch worker on its own. The position is HF's own streaming state_dict (file
and offset), so resuming does not re-read what was consumed.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from torchtitan.components.tokenizer import BaseTokenizer

from trinity_titan.job_config import ConfigError

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


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


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in _FORMATS
        )
        if any(not f.endswith(".json") for f in files):  # save_to_disk dirs: .json is metadata
            files = [f for f in files if not f.endswith(".json")]
    else:
        files = sorted(glob.glob(path))
    return files


def open_dataset(spec: SourceSpec) -> IterableDataset:
    """A streaming HF dataset for `spec`: local files by extension, else a hub name."""
    files = _local_files(spec.path)
    if files:
        kinds = {_FORMATS.get(os.path.splitext(f)[1]) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(f"{spec.path}: expected files of one of {sorted(_FORMATS)}")
        return load_dataset(kinds.pop(), data_files=files, split=spec.split, streaming=True)
    return load_dataset(spec.path, spec.name, split=spec.split, streaming=True)


class HFDocumentSource:
    """Tokenized documents (BOS ... EOS) of one shard of one HF dataset; restarts each epoch if
    `infinite` (HF reshuffles the file order per epoch, deterministically)."""

    def __init__(
        self,
        spec: SourceSpec,
        tokenizer: BaseTokenizer,
        shard_index: int,
        num_shards: int,
        infinite: bool,
    ):
        self.spec = spec
        self.tokenizer = tokenizer
        self.infinite = infinite
        ds = open_dataset(spec)
        if num_shards > 1:
            ds = split_dataset_by_node(ds, rank=shard_index, world_size=num_shards)
        self.ds = ds
        self._it = None
        self._pending: dict[str, Any] | None = None
        self.epoch = 0

    def _start(self) -> None:
        self.ds.set_epoch(self.epoch)
        if self._pending is not None:
            self.ds.load_state_dict(self._pending)
            self._pending = None
        self._it = self.ds.iter(batch_size=1)

    def next(self) -> np.ndarray:
        for _ in range(2):  # at most one epoch restart per document
            if self._it is None:
                self._start()
            try:
                text = next(self._it)[self.spec.text_field][0]
            except StopIteration:
                if not self.infinite:
                    raise
                self.epoch, self._it = self.epoch + 1, None
                continue
            return np.asarray(self.tokenizer.encode(text, add_bos=True, add_eos=True), np.int32)
        raise RuntimeError(f"data source {self.spec.path} has no documents in this shard")

    def state_dict(self) -> dict[str, Any]:
        hf = self._pending if self._it is None else self.ds.state_dict()
        return {"epoch": self.epoch, "hf": hf}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._pending = state["hf"]
        self._it = None
