"""Distributed Muon under torchrun: sharded runs update exactly like one device, and its state
checkpoints exactly.

The debug model trains 3 steps on 1 rank, FSDP 2, FSDP 2 + EP 2, TP 2 and FSDP 2 + TP 2 + EP 2 from
one seed checkpoint; the saved weights and optimizer state are compared, and a resumed run checks
that Muon's state survives save/load exactly.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.distributed.launch import from_seed, make_seed_checkpoint, run_train

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
