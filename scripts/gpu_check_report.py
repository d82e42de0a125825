"""Summarise the steps of scripts/gpu_check.sh: one PASS/FAIL/SKIP line per check, the targets.

    python scripts/gpu_check_report.py OUT_DIR --mode gpu|cpu-dry-run

Reads OUT_DIR/<check>.meta (exit status, limit, seconds), <check>.json (the bench's report),
<check>.log and cuda_tests.xml; writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md. Exit
status 1 when a check failed. The targets (issue 13) are computed from the bench reports:
- Nano proxy (Liger, fused loss) >= 1.3x the tokens/s of TorchTitan's DeepSeek-V3 at a matched size;
- Liger (fused loss) >= 1.15x the tokens/s and <= 0.6x the peak memory of the PyTorch path
  (backend torch, materialised logits: no fused kernel at all) at vocab 200192;
- MFU >= 35% (Liger, fused loss).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_CHECKS = (
    "bench_torch_fused",
    "bench_liger_fused",
    "bench_torch_logits",
    "bench_liger_logits",
    "bench_deepseek",
)
CHECKS = ("cuda_tests", *BENCH_CHECKS, "attention")


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    summary: str
    seconds: int | None = None
    limit_s: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Target:
    name: str
    goal: str
    value: str
    status: str  # met | not met | n/a


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _failed(out: Path, name: str, meta: dict[str, int]) -> Check | None:
    """A check that did not exit 0: timed out, or failed with its last line of stderr."""
    if meta["rc"] in (124, 137):
        return Check(name, "FAIL", f"timed out after {meta['limit_s']} s")
    if meta["rc"] != 0:
        return Check(name, "FAIL", f"exit {meta['rc']}: {_last_line(out / f'{name}.log')}")
    return None


def cuda_tests(out: Path) -> Check:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    bad = n["failures"] + n["errors"]
    summary = f"{passed} passed, {bad} failed, {n['skipped']} skipped (pytest -m cuda)"
    if bad:
        failed = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        return Check("cuda_tests", "FAIL", summary + ": " + ", ".join(failed[:5]))
    return Check("cuda_tests", "PASS" if passed else "SKIP", summary, detail=n)


def bench(out: Path, name: str) -> Check:
    report = json.loads((out / f"{name}.json").read_text())
    (run,) = report["runs"]
    if "skipped" in run:
        return Check(name, "SKIP", run["skipped"], detail=run)
    what = f"{run['model']} {run['backend']}, fused loss {'on' if run['fused_loss'] else 'off'}"
    figures = [f"{run['tokens_per_s']:,.0f} tokens/s"]
    if run["mfu"] is not None:
        figures.append(f"MFU {100 * run['mfu']:.1f}%")
    if run["peak_memory_gib"] is not None:
        figures.append(f"peak {run['peak_memory_gib']:.1f} GiB")
    figures.append(f"loss {run['first_loss']:.3f} -> {run['final_loss']:.3f}")
    detail = {
        **run,
        "compile": report["compile"],
        "device": report["device"],
        "vocab_size": report["model_shape"]["vocab_size"],
    }
    # random tokens: the loss need not fall in a few steps, but it must stay finite
    status = "PASS" if math.isfinite(run["final_loss"]) else "FAIL"
    return Check(name, status, f"{what}: " + ", ".join(figures), detail=detail)


def attention(out: Path) -> Check:
    report = json.loads((out / "attention.json").read_text())
    parts, status = [], "PASS"
    for row in report["attention"]:
        for layer in ("local", "global"):
            sdpa = row[f"{layer}_sdpa_ms"]
            if f"{layer}_flex_ms" in row:
                diff = row[f"{layer}_max_rel_diff"]
                parts.append(
                    f"seq {row['seq_len']} {layer}: flex {row[f'{layer}_flex_ms']:.2f} ms, "
                    f"sdpa {sdpa:.2f} ms ({row[f'{layer}_flex_speedup']:.2f}x), diff {diff:.1e}"
                )
                if diff > 2e-2:  # bf16 outputs of two kernels: a few ulps, not a wrong mask
                    status = "FAIL"
            else:
                parts.append(f"seq {row['seq_len']} {layer}: sdpa {sdpa:.2f} ms, flex skipped")
    return Check("attention", status, "; ".join(parts), detail=report)


def run_check(out: Path, name: str) -> Check:
    meta_path = out / f"{name}.meta"
    if not meta_path.is_file():
        return Check(name, "FAIL", "did not run")
    meta = json.loads(meta_path.read_text())
    # pytest exits 1 when a test failed: its junit file says which
    tests_ran = name == "cuda_tests" and meta["rc"] == 1 and (out / "cuda_tests.xml").is_file()
    check = None if tests_ran else _failed(out, name, meta)
    if check is None:
        try:
            if name == "cuda_tests":
                check = cuda_tests(out)
            elif name == "attention":
                check = attention(out)
            else:
                check = bench(out, name)
        except (OSError, ValueError, KeyError, ET.ParseError) as e:
            check = Check(name, "FAIL", f"unreadable output: {type(e).__name__}: {e}")
    check.seconds, check.limit_s = meta["seconds"], meta["limit_s"]
    return check


def targets(checks: dict[str, Check]) -> list[Target]:
    """The issue's targets from the bench runs that passed; n/a where a run is missing."""

    def run(name: str) -> dict[str, Any] | None:
        check = checks[name]
        return check.detail if check.status == "PASS" else None

    liger = run("bench_liger_fused")
    torch_logits, deepseek = run("bench_torch_logits"), run("bench_deepseek")
    why = "no Liger run: it needs CUDA"
    if liger is not None and liger["vocab_size"] != 200192:
        why = f"vocab {liger['vocab_size']}, not the Nano proxy's 200192"
        liger = None
    out = []

    def compare(name: str, a, b, key: str, bound: float, at_least: bool) -> None:
        goal = f"{'>=' if at_least else '<='} {bound}x"
        if a is None or b is None or a.get(key) is None or b.get(key) is None:
            out.append(Target(name, goal, "n/a", f"n/a ({why})"))
            return
        r = a[key] / b[key]
        met = r >= bound if at_least else r <= bound
        out.append(Target(name, goal, f"{r:.2f}x", "met" if met else "not met"))

    compare(
        "Nano proxy (Liger) vs DeepSeek-V3, tokens/s", liger, deepseek, "tokens_per_s", 1.3, True
    )
    compare("Liger vs PyTorch path, tokens/s", liger, torch_logits, "tokens_per_s", 1.15, True)
    compare(
        "Liger vs PyTorch path, peak memory", liger, torch_logits, "peak_memory_gib", 0.6, False
    )
    if liger is None or liger.get("mfu") is None:
        out.append(Target("MFU (Liger, fused loss)", ">= 35%", "n/a", f"n/a ({why})"))
    else:
        met = "met" if liger["mfu"] >= 0.35 else "not met"
        out.append(Target("MFU (Liger, fused loss)", ">= 35%", f"{100 * liger['mfu']:.1f}%", met))
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"{report['date']}, commit {report['commit']}, device: {report['device']}",
        "",
        "| check | status | key figure | seconds (limit) |",
        "|---|---|---|---|",
    ]
    for c in report["checks"]:
        summary = c["summary"].replace("|", "\\|")
        lines.append(
            f"| {c['name']} | {c['status']} | {summary} | {c['seconds']} ({c['limit_s']}) |"
        )
    lines += ["", "| target | goal | value | status |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['name']} | {t['goal']} | {t['value']} | {t['status']} |")
    return "\n".join(lines) + "\n"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=("gpu", "cpu-dry-run"), required=True)
    opts = p.parse_args(argv)
    checks = {name: run_check(opts.out, name) for name in CHECKS}
    device = next((c.detail["device"] for c in checks.values() if "device" in c.detail), "unknown")
    report = {
        "mode": opts.mode,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "device": device,
        "checks": [asdict(c) for c in checks.values()],
        "targets": [asdict(t) for t in targets(checks)],
    }
    (opts.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (opts.out / "gpu_check.md").write_text(markdown(report))
    for c in checks.values():
        print(f"{c.status} {c.name}: {c.summary} [{c.seconds} s of {c.limit_s}]")
    for t in report["targets"]:
        print(f"target {t['name']} {t['goal']}: {t['status']} ({t['value']})")
    return 1 if any(c.status == "FAIL" for c in checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
