"""Let TorchTitan 0.2.2 train on machines without an accelerator (CPU + gloo).

TorchTitan resolves its device once at import (`torchtitan.tools.utils.get_device_info`) and falls
back to "cuda" when no accelerator exists, so the stock trainer dies in `torch.cuda.set_device`.
`enable_cpu_training` rebinds the device globals that TorchTitan modules imported by name to a CPU
device module, after which `init_process_group` picks gloo. It changes nothing on a machine with an
accelerator. The other CPU gaps are closed here too, each used where it occurs:
- expert-parallel token permutation uses TorchTitan's own CPU fill path for CPU tensors
  (`install_cpu_permute`), instead of its Triton kernel;
- TorchTitan's token reorderer counts tokens with `torch.histc`, which has no int64 CPU kernel
  (`CpuSafeTokenReorderer`);
- FSDP2's PREMUL_SUM gradient reduction, which gloo rejects, is replaced by SUM
  (`use_sum_reduction_on_gloo`; same math: TorchTitan sets the divide factor to 1);
- TorchTitan's own MoE (DeepSeek-V3 in the benchmark) calls `torch.histc` on int64 directly
  (`cpu_int_histc`, for the duration of a block).
"""

from __future__ import annotations

import importlib
import os
import platform
import resource
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _get_available_device_type
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torchtitan.models.moe.moe import TokenReorderer

# The TorchTitan modules that bound `device_type` / `device_module` of torchtitan.tools.utils by name.
_DEVICE_GLOBAL_OWNERS = {
    "torchtitan.tools.utils": ("device_type", "device_module"),
    "torchtitan.distributed.utils": ("device_type", "device_module"),
    "torchtitan.distributed.parallel_dims": ("device_type",),
    "torchtitan.components.metrics": ("device_type", "device_module"),
    "torchtitan.tools.profiling": ("device_module",),
}


@dataclass(frozen=True)
class _CpuProperties:
    name: str
    total_memory: int


def _cpu_name() -> str:
    return platform.processor() or platform.machine() or "cpu"


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux: the process's peak resident memory (it cannot be reset).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build_cpu_device_module() -> types.ModuleType:
    """torch.cpu plus the few `torch.cuda`-style calls TorchTitan's trainer and metrics make."""
    mod = types.ModuleType("trinity_titan_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(mod, name, getattr(torch.cpu, name))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def memory_stats(device: Any = None) -> dict[str, int]:
        peak = _peak_rss_bytes()
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}

    mod.set_device = lambda device: None
    mod.current_device = lambda: 0
    mod.get_device_name = lambda device=None: _cpu_name()
    mod.get_device_properties = lambda device=None: _CpuProperties(_cpu_name(), total)
    mod.memory_stats = memory_stats
    mod.reset_peak_memory_stats = lambda device=None: None
    mod.empty_cache = lambda: None
    return mod


def has_accelerator() -> bool:
    return _get_available_device_type() is not None


def enable_cpu_training() -> bool:
    """Point TorchTitan at the CPU when no accelerator exists; returns whether it did."""
    install_cpu_permute()
    if has_accelerator():
        return False
    cpu = {"device_type": "cpu", "device_module": _build_cpu_device_module()}
    for owner, names in _DEVICE_GLOBAL_OWNERS.items():
        module = importlib.import_module(owner)
        for name in names:
            setattr(module, name, cpu[name])
    return True


def _generate_permute_indices_any_device(
    tokens_per_expert_group: torch.Tensor, *args: Any, **kwargs: Any
):
    """TorchTitan's permutation, with its CPU fill path for CPU tensors (no Triton kernel)."""
    from torchtitan.models.moe.kernels import generate_permute_indices

    kwargs.setdefault("use_cpu", tokens_per_expert_group.device.type == "cpu")
    return generate_permute_indices(tokens_per_expert_group, *args, **kwargs)


def install_cpu_permute() -> None:
    """Route expert-parallel token permutation of CPU tensors to TorchTitan's CPU fill path."""
    import torchtitan.models.moe.utils as moe_utils

    moe_utils.generate_permute_indices = _generate_permute_indices_any_device


class CpuSafeTokenReorderer(TokenReorderer):
    """TorchTitan's TokenReorderer. On CPU it sees the expert indices as floats (exact below 2^24
    experts), because `torch.histc` has no int64 CPU kernel; the counts come back as int64."""

    def forward(
        self, top_scores: torch.Tensor, selected_experts_indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if selected_experts_indices.device.type != "cpu":
            return super().forward(top_scores, selected_experts_indices)
        scores, order, counts = super().forward(top_scores, selected_experts_indices.float())
        return scores, order, counts.to(torch.int64)


def use_sum_reduction_on_gloo(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """gloo has no PREMUL_SUM; with TorchTitan's divide factor of 1, SUM is the same reduction."""
    if dist.get_backend(dp_mesh.get_group(dp_mesh.mesh_dim_names[-1])) != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


@contextmanager
def cpu_int_histc() -> Iterator[None]:
    """TorchTitan's MoE counts tokens with torch.histc on int64, which has no CPU kernel; on CPU,
    count through float (exact for these sizes). The benchmark uses it around TorchTitan's DeepSeek-V3 on CPU."""
    histc = torch.histc

    def histc_any(input, bins=100, min=0, max=0, *, out=None):  # noqa: A002
        if input.device.type == "cpu" and not input.is_floating_point():
            return histc(input.float(), bins=bins, min=min, max=max).to(input.dtype)
        return histc(input, bins=bins, min=min, max=max, out=out)

    torch.histc = histc_any
    try:
        yield
    finally:
        torch.histc = histc
