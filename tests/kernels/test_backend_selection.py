"""Which path runs where: Liger's fused loss may take CPU tensors under Triton's interpreter, the
norms and SwiGLU may not, and a "liger" training config without CUDA is still refused."""

from __future__ import annotations

import pytest
import torch

from trinity_titan.kernels import resolve_backend
from trinity_titan.kernels.backend import triton_interpreter, use_liger


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False), ("", False)],
)
def test_triton_interpreter_reads_the_env_var(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreter() is on


def test_cpu_tensors_take_liger_only_for_interpretable_kernels(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_liger("liger", x, x, interpretable=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_liger("liger", x, x, interpretable=True)
    assert not use_liger("liger", x, x)  # RMSNorm, SwiGLU: they fail under the interpreter
    assert not use_liger("torch", x, x, interpretable=True)
    assert not use_liger("liger", x, torch.zeros(2, 3, device="meta"), interpretable=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_liger_config_without_cuda_is_refused_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("liger")
    assert resolve_backend("auto") == "torch"
