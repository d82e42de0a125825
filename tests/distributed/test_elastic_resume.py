"""Elastic resume: a run saved on 2 ranks (1 worker each) continues on 1 rank with 2 workers, on
HSDP 2x2 without workers and on FSDP 2 + EP 2, with every token of every document trained on
exactly once.

One 2-rank run (FSDP 2, RSDB over two sources whose documents carry unique ids, two phases, a
batch ramp, Muon + AdamW, SMEBU, one dataloader worker) trains 8 steps and saves step 4. Copies of
its folder without step 8 resume from step 4 on the other layouts. Checked for each:

- the training state every layout starts step 5 with (model, expert biases, SMEBU momenta, Muon
  and AdamW state, gathered to full tensors) equals the 2-rank run's, bit for bit;
- the row traces of the first 4 steps and of the resumed steps together hold every trained token
  once: per document, the pieces follow each other from token 0 without gap or overlap, and every
  document open in a buffer at the save is continued from its read head;
- phase 2 starts at the same global token count: no document of the second source (weight 0 in
  phase 1) is in a row before the 10240th token (step 6), and readers switch at or after it; the
  batch ramp fires at the same step as in the 2-rank run;
- the loss after the resume stays within the 2-rank run's own step-to-step change.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import DEBUG_TOML, REPO, from_seed, make_seed_checkpoint, run_train
from tests.fixtures import debug_tokenizer
from trinity_titan.data.sources import SourceSpec, local_corpus

pytestmark = pytest.mark.slow

STEPS, SAVED = 8, 4
ARGS = (
    "--training.steps", str(STEPS),
    "--training.local_batch_size", "4",
    "--training.global_batch_size", "16",
    "--optimizer.name", "Muon",
    "--optimizer.muon_lr", "2e-2",
    "--moe.balance_method", "smebu",
    "--moe.smebu_lambda", "5e-2",
    "--moe.balance_loss_coeff", "1e-2",
    "--checkpoint.interval", str(SAVED),
    "--metrics.log_freq", "1",
)  # fmt: skip
DATA = """
[data]
mixing = "rsdb"
rsdb_buffer_docs = 4
seed = 11
jsonl_block_bytes = 2048
trace_rows = true

[[data.sources]]
path = "{a}"

[[data.sources]]
path = "{b}"

[[data.phases]]
tokens = 10240
weights = [1.0, 0.0]

[[data.phases]]
tokens = 1_000_000
weights = [0.5, 0.5]

[[data.batch_ramp]]
tokens = 14336
global_batch_size = 32
"""
SAVED_LAYOUT = ("--parallelism.data_parallel_shard_degree", "2",
                "--training.dataloader.num_workers", "1")  # fmt: skip
LAYOUTS = {
    "1 rank, 2 workers": (1, ("--parallelism.data_parallel_shard_degree", "1",
                              "--training.dataloader.num_workers", "2")),
    "HSDP 2x2, no worker": (4, ("--parallelism.data_parallel_replicate_degree", "2",
                                "--parallelism.data_parallel_shard_degree", "2",
                                "--training.dataloader.num_workers", "0")),
    "FSDP 2 + EP 2": (4, ("--parallelism.data_parallel_shard_degree", "4",
                          "--parallelism.expert_parallel_degree", "2",
                          "--training.dataloader.num_workers", "1")),
}  # fmt: skip


def _corpora(folder: Path) -> tuple[Path, Path]:
    """Two sources of documents 'doc <source><i>: ...' of varied lengths."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    paths = []
    for name, n in (("a", 90), ("b", 60)):
        path = folder / f"{name}.jsonl"
        lines = []
        for i in range(n):
            body = " ".join(words[(i * 7 + j) % 10] for j in range(10 + (i * 37) % 120))
            lines.append(json.dumps({"text": f"doc {name}{i}: {body}"}) + "\n")
        path.write_text("".join(lines))
        paths.append(path)
    return paths[0], paths[1]


def _lengths(paths) -> dict[tuple[int, int, int], int]:
    """Tokens (BOS ... EOS) of every document by (source, block, index in block)."""
    tok = debug_tokenizer()
    out = {}
    for k, path in enumerate(paths):
        corpus = local_corpus(SourceSpec(str(path)), jsonl_block_bytes=2048, table_block_rows=1)
        for block in range(len(corpus)):
            for i, doc in enumerate(corpus.records(block)):
                out[k, block, i] = len(tok.encode(doc["text"], add_bos=True, add_eos=True))
    assert len(out) == 150
    return out


def _trace(folder: Path, steps: range) -> list[tuple[tuple[int, ...], int, int]]:
    pieces = []
    for file in sorted((folder / "row_trace").glob("rank*.jsonl")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            if row["step"] in steps:
                pieces += [(tuple(p[:4]), p[4], p[5]) for p in row["pieces"]]
    return pieces


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for file in sorted((folder / "row_trace").glob("rank*.jsonl"))
            for line in file.read_text().splitlines()]  # fmt: skip


def _step_of(row: dict) -> int:
    return row["step"]


def _has_source(row: dict, source: int) -> bool:
    return any(p[0] == source for p in row["pieces"])


def _spans(pieces) -> dict[tuple[int, ...], list[tuple[int, int]]]:
    spans: dict = {}
    for address, start, end in pieces:
        spans.setdefault(address, []).append((start, end))
    return {a: sorted(s) for a, s in spans.items()}


def _check_contiguous(spans) -> None:
    for address, s in spans.items():
        assert s[0][0] == 0, (address, s)  # read from its first token
        for (_, end), (start, _) in zip(s, s[1:], strict=False):
            assert start == end, (address, s)  # no gap, no token twice


def _phase_and_ramp(log: str) -> tuple[list[int], list[str]]:
    """(the global token counts at which readers switched to phase 2, where the ramp fired)."""
    lines = log.splitlines()
    phase = [int(line.split(" from ")[1].split()[0]) for line in lines if "Data phase 2/2" in line]
    ramp = sorted({line.split("Batch ramp")[1].split(", gradient")[0] for line in lines
                   if "Batch ramp at" in line})  # fmt: skip
    return phase, ramp


def _data_position(folder: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "trinity_titan.tools.data_position", str(folder)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout


def test_resume_on_other_layouts_trains_every_token_once(tmp_path, monkeypatch):
    a, b = _corpora(tmp_path)
    config = tmp_path / "elastic.toml"
    config.write_text(DEBUG_TOML.read_text() + DATA.format(a=a, b=b))
    monkeypatch.setenv("STATE_DUMP_STEP", str(SAVED + 1))
    seed = make_seed_checkpoint(tmp_path / "seed")
    args = (*ARGS, *from_seed(seed))
    run = dict(config=config, module="tests.distributed.state_dump_trainer")

    full, log = run_train(tmp_path / "full", 2, *args, *SAVED_LAYOUT, **run)
    assert sorted(full) == list(range(1, STEPS + 1))
    full_phase, full_ramp = _phase_and_ramp(log)
    assert full_phase and all(10240 <= t < 10240 + 2048 for t in full_phase), full_phase
    second = sorted({_step_of(row) for row in _rows(tmp_path / "full") if _has_source(row, 1)})
    assert second and second[0] == 6, second  # the first step after the 10240th token
    assert full_ramp == [" at 14336 tokens (step 8): global batch 32 sequences"]
    saved = tmp_path / "full" / "checkpoint" / f"step-{SAVED}"
    position = _data_position(saved)
    assert "8,192 training tokens emitted by 2 reader(s); mixture phase 1" in position, position
    expected = torch.load(tmp_path / "full" / f"state_before_step{SAVED + 1}.pt")
    assert any("momentum_buffer" in k for k in expected["optimizer"])
    assert any("expert_bias_momentum" in k for k in expected["model"])

    lengths = _lengths((a, b))
    before = _spans(_trace(tmp_path / "full", range(1, SAVED + 1)))
    open_at_save = {
        addr: s[-1][1]
        for addr, s in before.items()
        if s[-1][1] < lengths[addr[0], addr[2], addr[3]]
    }
    assert open_at_save  # RSDB holds documents mid-way at the save
    noise = max(abs(full[s + 1] - full[s]) for s in range(1, STEPS))

    for name, (nproc, degrees) in LAYOUTS.items():
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        shutil.copytree(tmp_path / "full", folder)
        shutil.rmtree(folder / "checkpoint" / f"step-{STEPS}")
        (folder / f"state_before_step{SAVED + 1}.pt").unlink()
        for file in (folder / "row_trace").glob("*.jsonl"):  # keep the trace of steps 1-4
            rows = [r for r in file.read_text().splitlines() if json.loads(r)["step"] <= SAVED]
            file.write_text("".join(r + "\n" for r in rows))

        resumed, log = run_train(folder, nproc, *args, *degrees, **run)
        assert f"Resuming step-{SAVED} on another layout" in log, (name, log[-3000:])
        assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1)), name

        state = torch.load(folder / f"state_before_step{SAVED + 1}.pt")
        for part in ("model", "optimizer"):
            assert state[part].keys() == expected[part].keys(), (name, part)
            for key, want in expected[part].items():
                got = state[part][key]
                same = torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want
                assert same, (name, part, key)

        spans = _spans(_trace(folder, range(1, STEPS + 1)))
        _check_contiguous(spans)
        for address, head in open_at_save.items():
            after = [s for s in spans[address] if s[0] >= head]
            assert after and after[0][0] == head, (name, address, head, spans[address])

        phase, ramp = _phase_and_ramp(log)
        assert ramp == full_ramp, (name, ramp)
        # A reader that took over many open documents draws new ones later: it switches later.
        assert all(t >= 10240 for t in phase), (name, phase)
        second = {_step_of(r) for r in _rows(folder) if _has_source(r, 1)}
        assert min(second, default=STEPS) >= 6, (name, sorted(second))
        for s in range(SAVED + 1, STEPS + 1):
            assert abs(resumed[s] - full[s]) <= 2 * noise, (name, s, resumed, full, noise)
