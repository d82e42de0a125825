"""Where a run is in its data: `python -m trinity_titan.tools.data_position CHECKPOINT`.

    python -m trinity_titan.tools.data_position outputs/run/checkpoint/step-1000
    python -m trinity_titan.tools.data_position outputs/run/checkpoint   # its newest step
    python -m trinity_titan.tools.data_position ... --json

Reads the data position of every saved data-parallel rank and worker (no process group, no
model) and prints the totals of the `[data]` pipeline: per source the documents read (whole or
open in RSDB buffers and carry-over), their tokens, skipped documents and the epochs the readers
are in; the mixture phase and the global count of training tokens it follows; the layout it
was saved with. Layout-independent, so it is also what a resume on another layout continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

from trinity_titan.data.elastic import RANK_KEY, dataloader_keys, reader_states
from trinity_titan.data.position import DataPosition, data_position
from trinity_titan.job_config import ConfigError
from trinity_titan.training.checkpoint_select import STEP_FOLDER


def step_folder(path: Path) -> Path:
    """`path` if it is a step folder, else the newest `step-N` folder in it."""
    if (path / ".metadata").is_file():
        return path
    steps = [p for p in path.glob("step-*") if STEP_FOLDER.fullmatch(p.name)]
    steps = [p for p in steps if (p / ".metadata").is_file()]
    if not steps:
        raise ConfigError(f"{path} is neither a checkpoint step folder nor holds one")
    return max(steps, key=lambda p: int(p.name.split("-")[1]))


def read_position(folder: Path) -> tuple[DataPosition | None, dict[str, Any]]:
    """(the `[data]` pipeline's position, or None for the debug loader; the layout's values)."""
    reader = dcp.FileSystemReader(str(folder))
    keys = dataloader_keys(list(reader.read_metadata().state_dict_metadata))
    if not keys:
        raise ConfigError(f"{folder} holds no data position (a model-only checkpoint)")
    loader = {k: (b"" if k.startswith(RANK_KEY) else 0) for k in keys}
    state: dict[str, Any] = {"dataloader": loader}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)
    ranks = sorted(int(k[len(RANK_KEY) :]) for k in keys if k.startswith(RANK_KEY))
    readers = [
        r for rank in ranks for r in reader_states(pickle.loads(loader[RANK_KEY + str(rank)]))
    ]
    layout = {k: v for k, v in loader.items() if not k.startswith(RANK_KEY)}
    if not readers or "mixture" not in readers[0]:
        return None, layout
    return data_position(readers), layout


def report(folder: Path, position: DataPosition | None, layout: dict[str, Any]) -> str:
    lines = [
        f"{folder}: saved by {layout.get('world_size')} data-parallel rank(s), global batch "
        f"{layout.get('global_batch_size', '?')} sequences"
    ]
    if position is None:
        lines.append("debug loader ([training] dataset): one stream read by every rank")
        return "\n".join(lines)
    lines.append(
        f"{position.tokens:,} training tokens emitted by {position.readers} reader(s); mixture "
        f"phase {position.phase + 1}; layout changes so far: {position.generation}"
    )
    for k, s in enumerate(position.sources):
        epochs = sorted(set(s.epochs))
        lines.append(
            f"source {k}: {s.documents:,} documents read ({s.tokens:,} tokens), "
            f"{s.open_documents:,} of them open in buffers; {s.skipped:,} skipped; "
            f"epoch {'/'.join(map(str, epochs))}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trinity_titan.tools.data_position", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", type=Path, help="a step-N folder, or a checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        folder = step_folder(args.checkpoint)
        position, layout = read_position(folder)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"checkpoint": str(folder), "layout": layout,
               "position": dataclasses.asdict(position) if position else None}  # fmt: skip
        print(json.dumps(out, indent=2))
    else:
        print(report(folder, position, layout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
