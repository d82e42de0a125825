"""Tensor parallelism for Trinity's MoE on top of TorchTitan's `apply_moe_ep_tp`.

TorchTitan replicates the router over the TP group and marks the MoE output Partial. Two
gradients are then partial per TP rank and TorchTitan 0.2.2 does not sum them:

- The router gate: d loss / d gates is <dy, expert outputs>, and each TP rank holds only part of
  the expert outputs (a slice of every expert with expert-TP, a slice of the tokens with ETP 1).
  We sum the gradient of the gate's output over TP, which makes both the gate weight's gradient
  and the router's share of the input gradient whole.
- With ETP 1 (TP ranks borrowed for EP), each TP rank sends only its slice of the tokens to the
  experts, so the routed share of the input gradient holds only those tokens. We sum the
  gradient of the routed expert input over TP before it is scattered back to the tokens.

Both are identity in the forward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torchtitan.models.llama4.infra.parallelize import apply_moe_ep_tp


def sum_grad_over(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient over the 1-D `mesh` in backward.

    Written with DTensor (a replicated tensor whose gradient is declared Partial), as TorchTitan's
    MoE tensor parallelism does, so that torch.compile traces it.
    """
    return DTensor.from_local(x, mesh, (Replicate(),), run_check=False).to_local(
        grad_placements=(Partial(),)
    )


def apply_trinity_moe_ep_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh | None,
    ep_mesh: DeviceMesh | None,
    etp_mesh: DeviceMesh | None,
    ep_etp_mesh: DeviceMesh | None,
) -> None:
    """TorchTitan's MoE EP/TP plans, plus the two TP gradient sums described above."""
    apply_moe_ep_tp(
        model, tp_mesh=tp_mesh, ep_mesh=ep_mesh, etp_mesh=etp_mesh, ep_etp_mesh=ep_etp_mesh
    )
    if tp_mesh is None:
        return
    tokens_split = ep_mesh is not None and etp_mesh is None
    for block in model.layers.values():
        if not block.moe_enabled:
            continue
        # after NoParallel's output hook, so the output is a local tensor
        block.moe.router.gate.register_forward_hook(
            lambda _mod, _inp, out, m=tp_mesh: sum_grad_over(out, m)
        )
        if tokens_split:
            _RoutedInputFromSummedGrad(block.moe, tp_mesh)


class _RoutedInputFromSummedGrad:
    """With ETP 1, re-gathers the routed expert input from x through `sum_grad_over`.

    The MoE gathers `x[token_indices // top_k]` for this TP rank's slice of the tokens; its
    gradient reaches only those rows of x. Gathering instead from `sum_grad_over(x)` (same
    values) sums the rows of all TP ranks, so every rank gets the whole routed gradient. The
    hooks capture x (MoE input, after TP's all-gather) and the token indices (reorderer output,
    after TorchTitan's offset to global indices).
    """

    def __init__(self, moe: nn.Module, mesh: DeviceMesh) -> None:
        self.mesh, self.top_k = mesh, moe.router.top_k
        self.x: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        moe.register_forward_pre_hook(self._capture_input)
        moe.reorderer.register_forward_hook(self._capture_indices)
        # before EP's token dispatch, a pre-hook registered earlier by apply_moe_ep_tp
        moe.experts.register_forward_pre_hook(self._regather, prepend=True)

    def _capture_input(self, _mod, args):
        self.x = args[0]

    def _capture_indices(self, _mod, _inp, out):
        self.indices = out[1]

    def _regather(self, _mod, args):
        x, self.x = self.x, None
        indices, self.indices = self.indices, None
        routed = sum_grad_over(x.reshape(-1, x.shape[-1]), self.mesh)[indices // self.top_k]
        return (routed, *args[1:])
