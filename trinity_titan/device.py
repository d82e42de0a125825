"""Let TorchTitan 0.2.2 train on machines without an accelerator (CPU + gloo).

TorchTitan resolves its device once at import (`torchtitan.tools.utils.get_device_info`) and falls
back to "cuda" when no accelerator exists, so the stock trainer dies in `torch.cuda.set_device`.
`enable_cpu_training` rebinds the device globals that TorchTitan modules imported by name to a CPU
device module, after which `init_process_group` picks gloo. It changes nothing on a machine with an
accelerator. Two other CPU gaps are closed where they occur:
- expert-parallel token permutation uses TorchTitan's own CPU fill path for CPU tensors
  (`install_cpu_permute`), instead of its Triton kernel;
- FSDP2's PREMUL_SUM gradient reduction, which gloo rejects, is replaced by SUM in
  `trinity_titan.parallelize` (same math: TorchTitan sets the divide factor to 1).
"""

from __future__ import annotations

import importlib
import os
import platform
import resource
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch._utils import _get_available_device_type

# Modules that did `from torchtitan.tools.utils import device_type, device_module`.
_DEVICE_GLOBAL_OWNERS = (
    "torchtitan.tools.utils",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.components.metrics",
    "torchtitan.tools.profiling",
)


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
    cpu_module = _build_cpu_device_module()
    for owner in _DEVICE_GLOBAL_OWNERS:
        module = importlib.import_module(owner)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = cpu_module
    return True


def install_cpu_permute() -> None:
    """Route expert-parallel token permutation of CPU tensors to TorchTitan's CPU fill path."""
    import torchtitan.models.moe.utils as moe_utils
    from torchtitan.models.moe.kernels import generate_permute_indices

    if getattr(moe_utils.generate_permute_indices, "_trinity_cpu_aware", False):
        return

    def generate_permute_indices_any_device(
        tokens_per_expert_group: torch.Tensor, *args: Any, **kwargs: Any
    ):
        kwargs.setdefault("use_cpu", tokens_per_expert_group.device.type == "cpu")
        return generate_permute_indices(tokens_per_expert_group, *args, **kwargs)

    generate_permute_indices_any_device._trinity_cpu_aware = True
    moe_utils.generate_permute_indices = generate_permute_indices_any_device
