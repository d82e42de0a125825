"""The [data] pipeline: HF sources, phases, batch ramp, the TrainSpec loader and its resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures import REPO, debug_job_config, debug_tokenizer, job_config_from, write_corpora
from trinity_titan.data.loader import PackedDocumentStream, build_data_dataloader
from trinity_titan.data.mixture import PhaseSchedule
from trinity_titan.data.ramp import BatchRamp
from trinity_titan.data.sources import LocalDocumentSource, SourceSpec, local_corpus
from trinity_titan.job_config import ConfigError
from trinity_titan.training.checks import check_job


class Constant:
    """An endless in-memory source of documents of `length` copies of `token`."""

    def __init__(self, token: int, length: int):
        self.token, self.length, self.n = token, length, 0

    def next(self) -> tuple[np.ndarray, None]:
        self.n += 1
        return np.full(self.length, self.token, dtype=np.int32), None

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


@pytest.mark.parametrize("dp_world_size", [1, 2])
def test_phase_switches_at_the_token_boundary(dp_world_size):
    seq = 16
    # Documents of exactly one row each, so the row index tells when the source changed.
    schedule = PhaseSchedule([10 * seq, 20 * seq, 1], [[1, 0], [0, 1], [1, 1]])
    stream = PackedDocumentStream(
        lambda shard, n: [Constant(1, seq + 1), Constant(2, seq + 1)],
        schedule,
        seq_len=seq,
        mixing="sequential",
        dp_rank=dp_world_size - 1,
        dp_world_size=dp_world_size,
    )
    rows = [int(x["input"][0]) for (x, _), _ in zip(stream, range(60), strict=False)]
    first_b, first_mixed = 10 // dp_world_size, 30 // dp_world_size
    assert rows[:first_b] == [1] * first_b
    assert rows[first_b:first_mixed] == [2] * (first_mixed - first_b)
    assert set(rows[first_mixed:]) == {1, 2}


def test_batch_ramp_at_the_report_threshold():
    ramp = BatchRamp(12288, [{"tokens": 4_900_000_000_000, "global_batch_size": 16384}])
    # 2048 data-parallel ranks with one 8192-token sequence per micro-batch.
    assert ramp.grad_accum_at(0, 1, 2048) == 6
    assert ramp.grad_accum_at(4_900_000_000_000 - 1, 1, 2048) == 6
    assert ramp.grad_accum_at(4_900_000_000_000, 1, 2048) == 8
    with pytest.raises(ValueError, match="multiple"):
        ramp.validate(local_batch_size=3, dp_degree=2048)

    large = job_config_from(REPO / "train_configs" / "trinity_large.toml")
    ramp = BatchRamp.from_job_config(large, 2048)  # local batch 2 on 2048 ranks
    assert [ramp.grad_accum_at(t, 2, 2048) for t in (0, 4_900_000_000_000)] == [3, 4]

    cfg = debug_job_config()
    cfg.data.batch_ramp = [{"tokens": 100, "global_batch_size": 8}]
    with pytest.raises(ConfigError, match="batch_ramp.*trinity_titan.train"):
        check_job(cfg, 1, trinity_trainer=False, files=False)


def test_local_sources_shard_disjointly_and_cover_everything(tmp_path):
    jsonl, parquet, arrow = write_corpora(tmp_path)
    tok = debug_tokenizer()
    for spec, n_docs in (
        (SourceSpec(path=jsonl), 50),
        (SourceSpec(path=parquet, text_field="content"), 30),
        (SourceSpec(path=arrow), 10),
    ):
        corpus = local_corpus(spec, jsonl_block_bytes=256, table_block_rows=2)
        assert len(corpus) >= 5
        whole = _drain(LocalDocumentSource(spec, corpus, tok, 0, 1, infinite=False))
        assert len(whole) == n_docs
        assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in whole)
        for shards in (3, 4):  # shard = DP rank x worker
            parts = [
                _drain(LocalDocumentSource(spec, corpus, tok, i, shards, False))
                for i in range(shards)
            ]
            assert sum(map(len, parts)) == n_docs
            assert sorted(map(tuple, sum(parts, []))) == sorted(map(tuple, whole))


def _drain(source) -> list[np.ndarray]:
    out = []
    while True:
        try:
            out.append(source.next()[0])
        except StopIteration:
            return out


def _pipeline_config(tmp_path, mixing: str, workers: int):
    jsonl, parquet, _ = write_corpora(tmp_path)
    cfg = debug_job_config(
        "--training.seq_len", "24",
        "--training.local_batch_size", "2",
        "--training.dataloader.num_workers", str(workers),
    )  # fmt: skip
    cfg.data.sources = [{"path": jsonl}, {"path": parquet, "text_field": "content"}]
    cfg.data.phases = [{"tokens": 200, "weights": [1.0, 0.0]}, {"tokens": 1, "weights": [1, 3]}]
    cfg.data.mixing = mixing
    cfg.data.rsdb_buffer_docs = 8
    cfg.data.jsonl_block_bytes = 512
    cfg.data.table_block_rows = 4
    return cfg


@pytest.mark.parametrize(
    ("mixing", "workers", "snapshot_every"), [("rsdb", 2, 1), ("rsdb", 2, 8), ("sequential", 0, 64)]
)
def test_loader_resumes_with_identical_batches(tmp_path, mixing, workers, snapshot_every):
    cfg = _pipeline_config(tmp_path, mixing, workers)
    cfg.data.snapshot_every_n_batches = snapshot_every  # 8: the last snapshot + fast-forward
    tok = debug_tokenizer()

    def batches(loader, n):
        return [b for b, _ in zip(loader, range(n), strict=False)]

    # 2 DP ranks: look at rank 1. 80 batches go through both corpora several times (epochs).
    straight = batches(build_data_dataloader(2, 1, tok, cfg), 80)
    loader = build_data_dataloader(2, 1, tok, cfg)
    it = iter(loader)
    first = [next(it) for _ in range(37)]
    state = loader.state_dict()
    resumed = build_data_dataloader(2, 1, tok, cfg)
    resumed.load_state_dict(state)
    rest = batches(resumed, 43)
    boundaries = 0
    for (x, y), (xs, ys) in zip(first + rest, straight, strict=True):
        assert x["input"].shape == (2, 24) and torch.equal(x["input"][:, 1:], y[:, :-1])
        assert torch.equal(x["input"], xs["input"]) and torch.equal(y, ys)
        row = torch.cat([x["input"], y[:, -1:]], dim=1)
        # A piece of a document ends inside a row only at its EOS (what document masking cuts
        # at): a document start (BOS) inside a row always follows an EOS.
        before_bos = row[:, :-1][row[:, 1:] == tok.bos_id]
        assert bool((before_bos == tok.eos_id).all())
        boundaries += before_bos.numel()
    assert boundaries > 50
    other_rank = batches(build_data_dataloader(2, 0, tok, cfg), 4)
    assert not torch.equal(other_rank[0][0]["input"], straight[0][0]["input"])
