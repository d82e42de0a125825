"""Sharded Newton-Schulz: every layout FSDP2/HSDP/EP/TP gives equals Newton-Schulz of the full matrix.

4 gloo ranks, spawned in-process, orthogonalise updates laid out the ways FSDP2/HSDP/EP/TP shard
them (rows, columns, uneven shards, experts split on the expert dim or on a matrix dim, replicas,
matrices split on two mesh dims as FSDP + TP gives, and a layout only the full-tensor fallback
handles).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from trinity_titan.optim import orthogonalise

pytestmark = pytest.mark.slow

KJ = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------- in-process layouts, 4 ranks

# (global shape, mesh dims (replicate-or-ep, shard), placements)
LAYOUTS = [
    ((10, 6), (Replicate(), Shard(0))),  # HSDP, a row-sharded 2-D weight
    ((7, 9), (Replicate(), Shard(0))),  # uneven rows: shards of 4 and 3
    ((6, 3), (Replicate(), Shard(1))),  # columns; shards of 2 and 1
    ((3, 5), (Replicate(), Shard(0))),  # shards of 2 and 1 rows
    ((4, 6, 5), (Shard(0), Shard(0))),  # experts: EP x FSDP, both on the expert dim (local)
    ((4, 6, 5), (Shard(0), Shard(1))),  # experts: EP on experts, FSDP on dim 1 (owner in group)
    ((4, 5, 8), (Shard(0), Shard(2))),  # experts: FSDP on the input dim
    # matrices split on both mesh dims (FSDP x TP): all-gather over TP, then owner over FSDP
    ((6, 5), (Shard(0), Shard(1))),  # row-parallel under FSDP
    ((7, 5), (_StridedShard(0, split_factor=2), Shard(0))),  # col-parallel under FSDP2, uneven
    ((9, 4), (Shard(0), Shard(0))),  # both on the rows
    ((3, 6, 7), (Shard(1), Shard(2))),  # a batch of matrices
    ((6, 5), (Shard(0), _StridedShard(1, split_factor=2))),  # anything else: full-tensor fallback
]
KINDS = ["owner"] * 4 + ["local"] + ["owner"] * 2 + ["gather_owner"] * 4 + ["full"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layouts_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("outer", "shard"))
        group = {"use_muon": True, "ns_steps": 5, "ns_eps": 1e-7, "ns_dtype": "float32"}
        group["ns_coefficients"] = KJ
        torch.manual_seed(0)
        fulls = [torch.randn(shape) for shape, _ in LAYOUTS]
        work, expected = [], []
        # every rank has the same full tensors: slice locally (strided shards need it)
        for full, (_, placements) in zip(fulls, LAYOUTS, strict=True):
            param = distribute_tensor(full.clone(), mesh, placements, src_data_rank=None)
            work.append(orthogonalise.MuonUpdate(param, group, param.to_local().clone()))
            ref = orthogonalise.newton_schulz(full, KJ, 5, 1e-7, "float32")
            expected.append(distribute_tensor(ref, mesh, placements, src_data_rank=None).to_local())
        kinds = [orthogonalise.layout(w.param).kind for w in work]
        assert kinds == KINDS, kinds
        for got, want, (shape, _) in zip(
            orthogonalise.orthogonalise_all(work), expected, LAYOUTS, strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=str(shape))
    finally:
        dist.destroy_process_group()


def test_layouts_match_full_matrix():
    mp.start_processes(_layouts_worker, args=(4, _free_port()), nprocs=4, start_method="spawn")
