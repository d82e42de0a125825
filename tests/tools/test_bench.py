"""`python -m trinity_titan.tools.bench` end to end on the debug shapes, and the matched DeepSeek-V3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from trinity_titan.tools.bench import matched_deepseek, nano_proxy

REPO = Path(__file__).resolve().parents[2]
RUN_KEYS = {
    "params",
    "flops_per_token",
    "tokens_per_s",
    "mfu",
    "peak_memory_gib",
    "first_loss",
    "final_loss",
}


def test_bench_prints_json_for_each_backend_and_deepseek():
    cmd = [
        sys.executable,
        "-m",
        "trinity_titan.tools.bench",
        "--config",
        "train_configs/trinity_debug.toml",
    ]
    cmd += ["--steps", "4", "--warmup", "1", "--batch-size", "4", "--seq-len", "64"]
    cmd += ["--backends", "torch,liger", "--compare-deepseek"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["seq_len"] == 64 and report["batch_size"] == 4 and report["steps"] == 4
    runs = {(r["model"], r["backend"]): r for r in report["runs"]}
    assert set(runs) == {("trinity", "torch"), ("trinity", "liger"), ("deepseek_v3", "torchtitan")}
    if not torch.cuda.is_available():
        assert "CUDA" in runs["trinity", "liger"]["skipped"]
        del runs["trinity", "liger"]
    for key, run in runs.items():
        assert RUN_KEYS <= set(run), key
        assert run["tokens_per_s"] > 0 and math.isfinite(run["final_loss"]), key
        assert run["final_loss"] < run["first_loss"], key  # it trains
        if torch.cuda.is_available():
            assert 0 < run["mfu"] < 1 and run["peak_memory_gib"] > 0, key
        else:
            assert run["mfu"] is None and run["peak_memory_gib"] is None, key
    assert runs["trinity", "torch"]["fused_loss"] is True


def test_deepseek_is_matched_to_the_nano_proxy():
    """Same width, depth, experts and vocab: total parameters and FLOPs per token within 10%."""
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model

    from trinity_titan.model import TrinityModel

    trinity = nano_proxy(8)
    assert (trinity.vocab_size, trinity.dim, trinity.n_layers) == (200192, 1024, 8)
    deepseek = matched_deepseek(trinity)
    deepseek.moe_impl = "standard"  # set by update_from_config in the bench
    with torch.device("meta"):
        t_model, d_model = TrinityModel(trinity), DeepSeekV3Model(deepseek)
    t_params, t_flops = trinity.get_nparams_and_flops(t_model, 4096)
    d_params, d_flops = deepseek.get_nparams_and_flops(d_model, 4096)
    assert abs(d_params / t_params - 1) < 0.1, (t_params, d_params)
    assert abs(d_flops / t_flops - 1) < 0.1, (t_flops, d_flops)


def test_attention_timing_of_both_kernels():
    """`--attention`: the model's SDPA and FlexAttention ops, forward + backward, on a local and
    a global layer; FlexAttention has no backward on CPU and is reported as skipped there."""
    import copy

    from trinity_titan.model import trinity_flavors
    from trinity_titan.tools.bench import time_attention

    args = copy.deepcopy(trinity_flavors["debugmodel"])
    row = time_attention(args, 64, 1, torch.float32, torch.device("cpu"), repeats=2)
    assert row["local_sdpa_ms"] > 0 and row["global_sdpa_ms"] > 0
    assert "does not support backward on CPU" in row["local_flex_skipped"]
    assert "global_flex_skipped" in row and "local_max_rel_diff" not in row
