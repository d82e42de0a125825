"""Trinity's context-parallel attention: layout, halo plan, and equality with 1-rank attention
(with and without document masking)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
    _HeadTailLoadBalancer,
)

from tests.distributed.launch import REPO, run_workers
from trinity_titan.parallel.context_parallel import halo_plan, shard_positions


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_layout_is_torch_head_tail(cp):
    """The positions we assume are the ones TorchTitan's trainer shards the batch with."""
    seq = 48
    indices = _HeadTailLoadBalancer(seq, cp, "cpu")._generate_indices().flatten()
    assert torch.equal(shard_positions(seq, cp, True), indices.view(cp, -1))
    assert torch.equal(shard_positions(seq, cp, False), torch.arange(seq).view(cp, -1))


@pytest.mark.parametrize("cp,window,balance", [(2, 5, True), (3, 20, True), (4, 3, False)])
def test_halo_is_exactly_the_missing_window(cp, window, balance):
    seq = 48
    pos = shard_positions(seq, cp, balance)
    send, halo = halo_plan(seq, cp, balance, window)
    for r in range(cp):
        own = set(pos[r].tolist())
        needed = {k for q in own for k in range(max(0, q - window + 1), q + 1)} - own
        assert sorted(halo[r].tolist()) == sorted(needed)
        # what each source sends is what r receives from it, in the same order
        got = torch.cat([pos[s][send[s][r]] for s in range(cp)])
        assert torch.equal(got, halo[r])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_cp_attention_equals_one_rank(nproc):
    log = run_workers(REPO / "tests" / "distributed" / "workers" / "cp_attention.py", nproc)
    assert log.count("OK window=") == 8, log[-3000:]
    assert log.count("documents=True") == 3 + 2  # 3 OK cases, 2 MEM lines
    assert log.count("MEM seq=") == 6
