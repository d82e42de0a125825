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
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.models.llama4.infra.parallelize import apply_moe_ep_tp


class _SumGradOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient over `group` in backward."""
    return _SumGradOverGroup.apply(x, group)


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
    group = tp_mesh.get_group()
    tokens_split = ep_mesh is not None and etp_mesh is None
    for block in model.layers.values():
        if not block.moe_enabled:
            continue
        # after NoParallel's output hook, so the output is a local tensor
        block.moe.router.gate.register_forward_hook(
            lambda _mod, _inp, out, g=group: sum_grad_over(out, g)
        )
        if tokens_split:
            _RoutedInputFromSummedGrad(block.moe, group)


class _RoutedInputFromSummedGrad:
    """With ETP 1, re-gathers the routed expert input from x through `sum_grad_over`.

    The MoE gathers `x[token_indices // top_k]` for this TP rank's slice of the tokens; its
    gradient reaches only those rows of x. Gathering instead from `sum_grad_over(x)` (same
    values) sums the rows of all TP ranks, so every rank gets the whole routed gradient. The
    hooks capture x (MoE input, after TP's all-gather) and the token indices (reorderer output,
    after TorchTitan's offset to global indices).
    """

    def __init__(self, moe: nn.Module, group: dist.ProcessGroup) -> None:
        self.group, self.top_k = group, moe.router.top_k
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
        routed = sum_grad_over(x.reshape(-1, x.shape[-1]), self.group)[indices // self.top_k]
        return (routed, *args[1:])
