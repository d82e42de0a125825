"""The planner: Trinity Large on 2048 ranks (HSDP 16 x 128, EP 8) on a CPU, meta device, fake PG."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.distributed.launch import REPO
from trinity_titan.tools.plan import main

LARGE = REPO / "train_configs" / "trinity_large.toml"


def test_large_on_2048_ranks_fits_a_b300():
    proc = subprocess.run(
        [sys.executable, "-m", "trinity_titan.tools.plan", "--job.config_file", str(LARGE)]
        + ["--world-size", "2048"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    total = int(re.search(r"\(([\d,]+)\), 60 layers", out).group(1).replace(",", ""))
    assert 398e9 <= total <= 400e9
    assert "dp_replicate 16 x dp_shard 128" in out and "ep 8 (expert FSDP 16)" in out
    assert "2 whole expert matrices" in out
    # per rank: 398.6B / (128 x 8) routed, 1/128 of the rest, fp32 -> about 12.5 GB
    params_gb = float(re.search(r"parameters \(float32.*?([\d.]+) GB", out).group(1))
    assert 12.0 < params_gb < 13.0
    used = float(re.search(r"total\s+([\d.]+) GB\s+of 288 GB", out).group(1))
    assert used < 288 and out.strip().endswith("FITS")


def test_muon_keeps_less_optimizer_state_and_small_gpu_does_not_fit(capsys):
    base = ["--job.config_file", str(LARGE), "--world-size", "2048"]
    assert main(base + ["--optimizer.name", "AdamW", "--gpu-memory-gb", "40"]) == 1
    adamw = capsys.readouterr().out
    assert "DOES NOT FIT" in adamw
    assert main(base + ["--optimizer.name", "Muon"]) == 0
    muon = capsys.readouterr().out

    def opt(text: str) -> float:
        return float(re.search(r"optimizer state\s+([\d.]+) GB", text).group(1))

    # Muon: one buffer for the matrices (nearly all parameters) instead of AdamW's two
    assert 0.5 < opt(muon) / opt(adamw) < 0.52


def test_experts_not_divisible_by_ep_is_a_clear_error(capsys):
    code = main(
        ["--job.config_file", str(LARGE), "--world-size", "2048"]
        + ["--parallelism.expert_parallel_degree", "3"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "parallelism.expert_parallel_degree (3) must divide the number of routed experts (256)"
        in err
    )


def test_large_context_extension_with_cp4_and_balance_loss(capsys):
    """The report's long-context phase: CP 4 at 64K tokens, document masking and the balance
    loss still on. CP needs SDPA (the TOML's flex is refused, naming the flag); then it fits,
    with the per-sample document masks in the attention estimate."""
    base = ["--job.config_file", str(LARGE), "--world-size", "2048"]
    base += ["--parallelism.context_parallel_degree", "4"]
    base += ["--parallelism.data_parallel_shard_degree", "32"]
    base += ["--training.seq_len", "65536", "--training.local_batch_size", "1"]
    assert main(base) == 2
    assert "set --model.attn_type sdpa" in capsys.readouterr().err
    assert main(base + ["--model.attn_type", "sdpa"]) == 0
    out = capsys.readouterr().out
    assert "dp_replicate 16 x dp_shard 32 x cp 4" in out and out.strip().endswith("FITS")
    global_mask = float(re.search(r"one global layer .*?mask ([\d.]+)", out).group(1))
    assert global_mask > 0  # document masking: global layers need an explicit mask under CP
    assert main(base + ["--model.attn_type", "sdpa", "--model.attn_mask_type", "causal"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"one global layer .*?mask ([\d.]+)", out).group(1)) == 0
