"""Distributed Muon: sharded runs update exactly like one device, and its state checkpoints exactly.

`test_layouts_match_full_matrix` spawns 4 gloo ranks in-process and orthogonalises updates laid out
the ways FSDP2/HSDP/EP/TP shard them (rows, columns, uneven shards, experts split on the expert dim
or on a matrix dim, replicas, matrices split on two mesh dims as FSDP + TP gives, and a layout only
the full-tensor fallback handles) against Newton-Schulz of the full matrix. `test_sharded_layouts_match_one_rank` trains the debug model 3 steps with
`torchrun` on 1 rank, FSDP 2, FSDP 2 + EP 2, TP 2 and FSDP 2 + TP 2 + EP 2 from one seed
checkpoint and compares the saved weights and optimizer state; a resumed run checks that Muon's state survives save/load exactly.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torchrun_utils import from_seed, make_seed_checkpoint, run_train

from trinity_titan import muon

pytestmark = pytest.mark.slow

STEPS = 3
MUON = ("--optimizer.name", "Muon", "--optimizer.muon_lr", "0.02", "--optimizer.lr", "3e-3")
COMMON = (
    *MUON,
    "--training.steps", str(STEPS),
    "--training.global_batch_size", "16",
    "--checkpoint.interval", "2",
    "--checkpoint.no_last_save_model_only",
)  # fmt: skip


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
        group["ns_coefficients"] = muon.DEFAULT_NS_COEFFICIENTS
        torch.manual_seed(0)
        fulls = [torch.randn(shape) for shape, _ in LAYOUTS]
        work, expected = [], []
        # every rank has the same full tensors: slice locally (strided shards need it)
        for full, (_, placements) in zip(fulls, LAYOUTS, strict=True):
            param = distribute_tensor(full.clone(), mesh, placements, src_data_rank=None)
            work.append(muon._MuonUpdate(param, group, param.to_local().clone()))
            ref = muon.newton_schulz(full)
            expected.append(distribute_tensor(ref, mesh, placements, src_data_rank=None).to_local())
        kinds = [muon.layout(w.param).kind for w in work]
        assert kinds == KINDS, kinds
        for got, want, (shape, _) in zip(
            muon.orthogonalise_all(work), expected, LAYOUTS, strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=str(shape))
    finally:
        dist.destroy_process_group()


def test_layouts_match_full_matrix():
    mp.start_processes(_layouts_worker, args=(4, _free_port()), nprocs=4, start_method="spawn")


# ---------------------------------------------------------------- torchrun, 1 vs 2 ranks


def _checkpoint(step_dir) -> dict[str, torch.Tensor]:
    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    keys = [k for k, m in meta.items() if hasattr(m, "size") and k.split(".")[0] != "dataloader"]
    state = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, storage_reader=reader)
    return state


def _compare(a: dict, b: dict, what: str, adamw_atol: float = 1e-4) -> None:
    """Muon's matrices and every optimizer state to fp32 round-off; AdamW-updated weights looser.

    AdamW's g / sqrt(v) turns the round-off of a near-cancelling embedding-row gradient (summed
    in another order across ranks) into a visible step: TorchTitan's own AdamW differs by
    ~2.5e-5 on the embedding between 1 and 2 ranks after 3 steps at lr 3e-3, and by 3.1e-4
    between 1 rank and TP 2 (where the TP ranks add the embedding gradient up).
    """
    assert set(a) == set(b), (what, set(a) ^ set(b))
    for key in a:
        adamw_weight = key.startswith(("tok_embeddings", "output")) or a[key].ndim == 1
        atol = adamw_atol if adamw_weight else 1e-6
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=atol, msg=f"{what}: {key}")


def test_sharded_layouts_match_one_rank(tmp_path):
    seed = make_seed_checkpoint(tmp_path / "seed")
    args = (*COMMON, *from_seed(seed))
    run_train(tmp_path / "one", 1, *args, "--training.local_batch_size", "16")
    dp2 = ("--training.local_batch_size", "8", "--parallelism.data_parallel_shard_degree", "2")
    ep2 = ("--parallelism.expert_parallel_degree", "2")
    tp2 = ("--parallelism.tensor_parallel_degree", "2")
    run_train(tmp_path / "fsdp", 2, *args, *dp2)
    _, log = run_train(tmp_path / "ep", 2, *args, *dp2, *ep2)
    assert "Applied FSDP to the model" in log
    # TP: norm weights get Partial gradients and the embedding a Replicate one for a Shard(0)
    # weight; the optimizer must lay each out like its parameter before the local-shard math.
    no_dp = ("--training.local_batch_size", "16", "--parallelism.data_parallel_shard_degree", "1")
    _, log = run_train(tmp_path / "tp", 2, *args, *no_dp, *tp2)
    assert "Applied tensor parallelism" in log
    run_train(tmp_path / "tp_ep", 4, *args, *dp2, *tp2, *ep2)

    final = f"checkpoint/step-{STEPS}"
    one = _checkpoint(tmp_path / "one" / final)
    assert any("momentum_buffer" in k and "experts" in k for k in one), sorted(one)[:20]
    assert any("exp_avg_sq" in k and "tok_embeddings" in k for k in one)
    _compare(one, _checkpoint(tmp_path / "fsdp" / final), "FSDP 2")
    _compare(one, _checkpoint(tmp_path / "ep" / final), "FSDP 2 + EP 2")
    _compare(one, _checkpoint(tmp_path / "tp" / final), "TP 2", adamw_atol=5e-4)
    _compare(one, _checkpoint(tmp_path / "tp_ep" / final), "FSDP 2 + TP 2 + EP 2", adamw_atol=5e-4)

    # Resume the EP run from step 2: Muon's state (sharded DTensors) must come back exactly.
    shutil.move(tmp_path / "ep" / final, tmp_path / "ep_full")
    _, log = run_train(tmp_path / "ep", 2, *args, *dp2, *ep2)
    assert f"Training starts at step {STEPS}" in log
    resumed, full = _checkpoint(tmp_path / "ep" / final), _checkpoint(tmp_path / "ep_full")
    for key in full:
        assert torch.equal(resumed[key], full[key]), key
