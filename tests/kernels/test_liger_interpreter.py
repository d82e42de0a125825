"""The project's Liger fused loss (`backend="liger"`) on CPU under Triton's interpreter.

Liger's fused linear cross-entropy runs on CPU tensors when TRITON_INTERPRET=1 (its RMSNorm and
SwiGLU do not; their Liger tests stay CUDA-only in tests/test_kernels.py). The flag must be set
before triton and liger-kernel are imported, so one worker subprocess computes every case and the
tests compare its values and gradients with the PyTorch path and a float64 reference here.
Tiny shapes: the interpreter runs each kernel program in Python.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:  # before anything that imports it
    pytest.skip(
        "triton is not installed (scripts/setup.sh installs it on machines without CUDA); "
        "Liger's kernels need it, on CPU through its interpreter",
        allow_module_level=True,
    )

import torch
import torch.nn.functional as F

from trinity_titan.kernels import fused_linear_cross_entropy

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("liger_interpreter_worker.py")
N, D, V = 37, 16, 97
IGNORED = (0, 5, 11, 30)
CHUNK = 8  # < N: the statistics pass (and Liger's own 8-token chunks here) cross chunk edges
UPSTREAM = 1.0 / 3.0  # the trainer backpropagates loss_sum / num_tokens; 1/3 is no bf16 number
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CASES = [
    dict(dtype=dtype, z=z, logit_stats=stats, chunk_size=CHUNK)
    for dtype in DTYPES
    for z in (0.0, 1e-4, 1e-2)
    for stats in (True, False)
]
CASE_IDS = [f"{c['dtype']}-z{c['z']:g}-stats{int(c['logit_stats'])}" for c in CASES]

# Tolerances per dtype, 2-10x the measured errors. fp32: all within 4e-7. bf16: logits are
# rounded to bf16 before the fp32 softmax (as nn.Linear would) on both paths, so their loss_sum
# agrees to 1e-7; Liger stores the logit gradients and its per-token z-loss in bf16, and Triton's
# interpreter (3.9) casts fp32 to bf16 by truncation, not rounding: there its bf16 gradients come
# out ~5e-3 small (least-squares gain vs float64; the PyTorch path's is 1e-4) and the z_sum it
# yields without the statistics pass 2.5e-3 small. On a GPU the cast rounds to nearest.
TOL = {
    "float32": dict(value_rtol=2e-6, value_atol=1e-4, liger_z_rtol=2e-6, grad_rel=2e-6),
    "bfloat16": dict(value_rtol=2e-3, value_atol=1e-2, liger_z_rtol=8e-3, grad_rel=1.5e-2),
}
LOSS_VS_TORCH_RTOL = 1e-5  # same logits, fp32 loss on both paths


@pytest.fixture(scope="module")
def problem() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(N, D, generator=gen)
    weight = 0.5 * torch.randn(V, D, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[list(IGNORED)] = -100
    return {
        name: dict(hidden=hidden.to(dtype), weight=weight.to(dtype), labels=labels)
        for name, dtype in DTYPES.items()
    }


@pytest.fixture(scope="module")
def liger_run(problem, tmp_path_factory) -> dict:
    """Run the worker once under TRITON_INTERPRET=1; returns its outputs (+ wall seconds)."""
    tmp = tmp_path_factory.mktemp("liger_interpreter")
    inputs, outputs = tmp / "inputs.pt", tmp / "outputs.pt"
    torch.save(dict(data=problem, cases=CASES, upstream=UPSTREAM), inputs)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(inputs), str(outputs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    out = torch.load(outputs)
    out["seconds"] = time.perf_counter() - start
    return out


def float64_reference(hidden, weight, labels, z, ignore_index=-100) -> dict[str, torch.Tensor]:
    """Naive terms and upstream-scaled gradients: logits = h @ W^T in float64, autograd."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logits = h @ w.t()
    valid = labels != ignore_index
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    z_sum = torch.logsumexp(logits[valid], dim=-1).square().sum()
    loss = ce + z * z_sum
    grad_h, grad_w = torch.autograd.grad(UPSTREAM * loss, (h, w))
    rows = logits[valid].detach()
    return dict(
        loss_sum=loss.detach(),
        ce_sum=ce.detach(),
        z_sum=z_sum.detach(),
        logit_max=rows.max(),
        logit_sum=rows.sum(),
        grad_hidden=grad_h,
        grad_weight=grad_w,
    )


def torch_path(hidden, weight, labels, z, chunk_size) -> dict[str, torch.Tensor]:
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    terms = fused_linear_cross_entropy(
        h, w, labels, z_loss_coeff=z, chunk_size=chunk_size, backend="torch"
    )
    grad_h, grad_w = torch.autograd.grad(
        terms.loss_sum, (h, w), grad_outputs=torch.tensor(UPSTREAM)
    )
    return {**{k: v.detach() for k, v in terms._asdict().items()}, "grad_hidden": grad_h}, grad_w


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def test_worker_ran_liger_on_cpu_under_the_interpreter(liger_run):
    """The loss went through Liger's kernels, interpreted; RMSNorm / SwiGLU kept PyTorch."""
    assert liger_run["interpreter_on"]
    assert liger_run["kernel_type"] == "InterpretedFunction"
    for case, result in zip(CASES, liger_run["results"], strict=True):
        assert result["grad_fn"] == "LigerFusedLinearCrossEntropyFunctionBackward", case
    assert liger_run["norm_is_torch"] and "Liger" not in liger_run["norm_grad_fn"]
    assert liger_run["swiglu_is_torch"] and "Liger" not in liger_run["swiglu_grad_fn"]
    assert liger_run["seconds"] < 120, liger_run["seconds"]


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_liger_matches_torch_path_and_float64(problem, liger_run, index):
    case = CASES[index]
    data = problem[case["dtype"]]
    tol = TOL[case["dtype"]]
    z, stats = case["z"], case["logit_stats"]
    got = liger_run["results"][index]
    terms = got["terms"]
    ref = float64_reference(data["hidden"], data["weight"], data["labels"], z)
    torch_terms, torch_grad_w = torch_path(
        data["hidden"], data["weight"], data["labels"], z, case["chunk_size"]
    )

    assert terms["num_valid"].item() == N - len(IGNORED) == torch_terms["num_valid"].item()
    rtol = dict.fromkeys(["loss_sum", "ce_sum", "logit_sum"], tol["value_rtol"])
    if stats:
        rtol.update(logit_max=tol["value_rtol"], z_sum=tol["value_rtol"])
    else:
        assert torch.isnan(terms["logit_max"])
        if z > 0:  # z_sum is then Liger's z-loss over the coefficient
            rtol["z_sum"] = tol["liger_z_rtol"]
        else:
            assert torch.isnan(terms["z_sum"])
    for name, name_rtol in rtol.items():
        value = terms[name]
        assert value.dtype == torch.float32 and value.ndim == 0, name
        for other, label in ((ref[name], "float64"), (torch_terms[name], "torch path")):
            torch.testing.assert_close(
                value.double(),
                other.double(),
                rtol=name_rtol,
                atol=tol["value_atol"],
                msg=lambda m, name=name, label=label: f"{name} vs {label}: {m}",
            )
    torch.testing.assert_close(
        terms["loss_sum"], torch_terms["loss_sum"], rtol=LOSS_VS_TORCH_RTOL, atol=0
    )

    dtype = DTYPES[case["dtype"]]
    for name, torch_grad in (
        ("grad_hidden", torch_terms["grad_hidden"]),
        ("grad_weight", torch_grad_w),
    ):
        grad = got[name]
        assert grad.dtype == dtype, name
        assert rel_error(grad, ref[name]) < tol["grad_rel"], (name, rel_error(grad, ref[name]))
        assert rel_error(grad, torch_grad) < tol["grad_rel"], (name, rel_error(grad, torch_grad))
    assert got["grad_hidden"][list(IGNORED)].abs().max() == 0  # ignored tokens: no gradient


@pytest.mark.parametrize(
    "index", [i for i, c in enumerate(CASES) if c["z"] == 0], ids=lambda i: CASE_IDS[i]
)
def test_liger_without_z_loss_is_plain_cross_entropy(problem, liger_run, index):
    """z coefficient 0: loss_sum == ce_sum == F.cross_entropy(sum) on the logits nn.Linear makes."""
    case = CASES[index]
    data = problem[case["dtype"]]
    terms = liger_run["results"][index]["terms"]
    logits = F.linear(data["hidden"], data["weight"]).float()
    plain = F.cross_entropy(logits, data["labels"], reduction="sum")
    torch.testing.assert_close(terms["loss_sum"], plain, rtol=1e-6, atol=1e-5)
    assert terms["ce_sum"].item() == terms["loss_sum"].item()
    assert math.isfinite(plain.item())
