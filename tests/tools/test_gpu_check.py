"""scripts/gpu_check.sh: the CPU dry run end to end, and its report's verdicts on GPU-like output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from scripts import gpu_check_report as report_module
from tests.fixtures import REPO

CHECKS = report_module.CHECKS


@pytest.mark.slow
def test_cpu_dry_run_writes_json_and_markdown_with_every_check(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu-dry-run", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-dry-run"
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {
        "cuda_tests": "SKIP",  # every CUDA test collected, and skipped
        "bench_torch_fused": "PASS",
        "bench_liger_fused": "SKIP",
        "bench_torch_logits": "PASS",
        "bench_liger_logits": "SKIP",
        "bench_deepseek": "PASS",
        "attention": "PASS",
    }
    checks = {c["name"]: c for c in report["checks"]}
    assert "skipped (pytest -m cuda)" in checks["cuda_tests"]["summary"]
    assert checks["bench_torch_fused"]["detail"]["compile"] is True
    assert checks["bench_torch_logits"]["detail"]["fused_loss"] is False
    assert all(t["status"].startswith("n/a") for t in report["targets"])
    assert len(report["targets"]) == 4
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines[: len(CHECKS)]] == [
        [status[name], f"{name}:"] for name in CHECKS
    ]
    assert sum(line.startswith("target ") for line in lines) == 4
    markdown = (out / "gpu_check.md").read_text()
    for name in CHECKS:
        assert f"| {name} | {status[name]} |" in markdown


def _bench(out: Path, name: str, run: dict, vocab: int = 200192) -> None:
    report = {"compile": True, "device": "NVIDIA H200", "model_shape": {"vocab_size": vocab}}
    (out / f"{name}.json").write_text(json.dumps({**report, "runs": [run]}))
    (out / f"{name}.meta").write_text('{"rc": 0, "limit_s": 60, "seconds": 30}')
    (out / f"{name}.log").write_text("")


def _run(backend: str, fused: bool, tps: float, mfu: float | None, mem: float | None) -> dict:
    return dict(model="trinity", backend=backend, fused_loss=fused, tokens_per_s=tps, mfu=mfu,
                peak_memory_gib=mem, first_loss=12.3, final_loss=12.2)  # fmt: skip


def test_report_computes_the_targets_from_gpu_runs(tmp_path, capsys):
    """Synthetic GPU output: the verdicts, a timed-out step, a failed CUDA test."""
    _bench(tmp_path, "bench_torch_fused", _run("torch", True, 50_000, 0.30, 30.0))
    _bench(tmp_path, "bench_liger_fused", _run("liger", True, 60_000, 0.36, 20.0))
    _bench(tmp_path, "bench_torch_logits", _run("torch", False, 50_000, 0.30, 40.0))
    _bench(tmp_path, "bench_liger_logits", _run("liger", False, 55_000, 0.33, 38.0))
    _bench(tmp_path, "bench_deepseek", {**_run("torchtitan", False, 48_000, 0.3, 35.0),
                                        "model": "deepseek_v3"})  # fmt: skip
    (tmp_path / "attention.meta").write_text('{"rc": 124, "limit_s": 40, "seconds": 40}')
    (tmp_path / "attention.log").write_text("")
    (tmp_path / "cuda_tests.meta").write_text('{"rc": 1, "limit_s": 60, "seconds": 50}')
    (tmp_path / "cuda_tests.log").write_text("")
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad">'
        "<failure/></testcase></testsuite></testsuites>"
    )
    assert report_module.main([str(tmp_path), "--mode", "gpu"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["attention"]["status"] == "FAIL" and "timed out" in checks["attention"]["summary"]
    assert (
        checks["cuda_tests"]["status"] == "FAIL"
        and "tests.a::bad" in checks["cuda_tests"]["summary"]
    )
    assert checks["bench_liger_fused"]["status"] == "PASS"
    assert "MFU 36.0%" in checks["bench_liger_fused"]["summary"]
    targets = {t["name"]: (t["value"], t["status"]) for t in report["targets"]}
    assert targets == {
        "Nano proxy (Liger) vs DeepSeek-V3, tokens/s": ("1.25x", "not met"),
        "Liger vs PyTorch path, tokens/s": ("1.20x", "met"),
        "Liger vs PyTorch path, peak memory": ("0.50x", "met"),
        "MFU (Liger, fused loss)": ("36.0%", "met"),
    }
    printed = capsys.readouterr().out
    assert "target Liger vs PyTorch path, tokens/s >= 1.15x: met (1.20x)" in printed


def test_report_needs_a_cuda_test_that_ran_and_flags_broken_output(tmp_path):
    (tmp_path / "cuda_tests.meta").write_text('{"rc": 0, "limit_s": 60, "seconds": 50}')
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2"/></testsuites>'
    )
    check = report_module.run_check(tmp_path, "cuda_tests")
    assert check.status == "SKIP" and "0 passed, 0 failed, 2 skipped" in check.summary
    (tmp_path / "attention.meta").write_text('{"rc": 0, "limit_s": 40, "seconds": 5}')
    (tmp_path / "attention.json").write_text('{"attention": [{"seq_len": 4096}]}')
    check = report_module.run_check(tmp_path, "attention")
    assert check.status == "FAIL" and "unreadable output: KeyError" in check.summary


def test_report_compares_flex_with_sdpa(tmp_path):
    row = {"seq_len": 4096, "batch": 1}
    for layer in ("local", "global"):
        row |= {f"{layer}_sdpa_ms": 3.0, f"{layer}_flex_ms": 1.5, f"{layer}_flex_speedup": 2.0,
                f"{layer}_max_rel_diff": 4e-3}  # fmt: skip
    (tmp_path / "attention.meta").write_text('{"rc": 0, "limit_s": 40, "seconds": 20}')
    (tmp_path / "attention.json").write_text(json.dumps({"attention": [row]}))
    check = report_module.run_check(tmp_path, "attention")
    assert check.status == "PASS"
    assert "seq 4096 local: flex 1.50 ms, sdpa 3.00 ms (2.00x)" in check.summary
    row["global_max_rel_diff"] = 0.1  # not the same attention
    (tmp_path / "attention.json").write_text(json.dumps({"attention": [row]}))
    assert report_module.run_check(tmp_path, "attention").status == "FAIL"
