"""Which implementation the fused kernels use: Liger's Triton kernels (CUDA) or plain PyTorch.

`[kernels] backend` is "auto", "liger" or "torch". "auto" picks Liger when CUDA is available and
liger-kernel imports, PyTorch otherwise. The choice is resolved once, at configuration time, so a
"liger" request on a machine without CUDA fails before any model is built. Tests can still run
Liger's fused loss on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

KernelBackend = Literal["auto", "liger", "torch"]
ResolvedBackend = Literal["liger", "torch"]


@functools.cache
def liger_import_error() -> str | None:
    """None when liger-kernel's ops import, else the reason they do not."""
    try:
        import liger_kernel.ops  # noqa: F401
    except Exception as e:  # an import of Triton can fail in many ways
        return f"{type(e).__name__}: {e}"
    return None


def resolve_backend(requested: str) -> ResolvedBackend:
    """ "auto" -> "liger" if CUDA and liger-kernel are usable, else "torch"; validate the others."""
    if requested not in ("auto", "liger", "torch"):
        raise ValueError(f"[kernels] backend must be 'auto', 'liger' or 'torch', got {requested!r}")
    if requested == "torch":
        return "torch"
    cuda = torch.cuda.is_available()
    problem = liger_import_error()
    if requested == "auto":
        return "liger" if cuda and problem is None else "torch"
    if not cuda:
        raise ValueError(
            "[kernels] backend = 'liger' needs a CUDA device (Liger's kernels are Triton GPU "
            "kernels and have no CPU path); use 'auto' or 'torch' on this machine"
        )
    if problem is not None:
        raise ValueError(f"[kernels] backend = 'liger' but liger-kernel does not import: {problem}")
    return "liger"


def triton_interpreter() -> bool:
    """TRITON_INTERPRET is on (the values Triton 3.x accepts): Triton kernels then run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def use_liger(backend: str, *tensors: torch.Tensor, interpretable: bool = False) -> bool:
    """Liger runs only on CUDA tensors; inside torch.compile the PyTorch path is traced instead.

    Under torch.compile Inductor fuses the PyTorch RMSNorm / SwiGLU into its own Triton kernels,
    and TorchTitan compiles blocks with fullgraph=True, where an opaque kernel launch could break
    the graph; so Liger is used in eager regions only.
    `interpretable=True` (the fused loss only: Liger's RMSNorm and SwiGLU fail under Triton's
    interpreter) also accepts CPU tensors when `triton_interpreter()`, so tests can run it on CPU.
    """
    if backend != "liger" or torch.compiler.is_compiling():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpretable and triton_interpreter() and all(t.device.type == "cpu" for t in tensors)
