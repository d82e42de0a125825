"""LM head + cross-entropy + z-loss without materialising the [tokens, vocab] logits.

    loss_sum = sum over valid tokens t of  ce_t + z_loss_coeff * lse_t**2,
    ce_t = lse_t - logit_t[label_t],  lse_t = logsumexp_v(logit_t),  logit_t = W h_t.

Both paths walk the tokens in chunks, compute a chunk's logits (matmul in the input dtype, then
fp32), its loss terms and the gradient of the loss with respect to the chunk's logits, and fold
that gradient straight into d hidden and d W (accumulated in fp32) during the forward. Backward
only scales the stored gradients by the incoming scalar, so at most one chunk of logits is ever
alive. The 200k vocabulary therefore costs chunk x vocab memory instead of tokens x vocab.

- "torch": a `torch.autograd.Function` written here (any device, the reference for the other).
- "liger": Liger's `LigerFusedLinearCrossEntropyFunction` (Triton: CUDA, or CPU tensors under
  Triton's interpreter, `TRITON_INTERPRET=1`, which the tests use) with
  lse_square_scale = z_loss_coeff, reduction "sum", fp32 gradient accumulation. Liger returns the
  loss and the z-loss but not the logit statistics; those come from one more chunked, no-grad pass
  (another 2 N D V FLOPs, a third of the head's training FLOPs) unless `logit_stats=False`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

from trinity_titan.kernels.backend import use_liger


class LossTerms(NamedTuple):
    """Summed loss terms of one micro-batch (see the shared loss interface)."""

    loss_sum: torch.Tensor
    """Differentiable scalar: sum over valid tokens of ce_t + z_loss_coeff * lse_t**2."""
    ce_sum: torch.Tensor
    """Detached fp32 scalar: sum of ce_t over valid tokens."""
    z_sum: torch.Tensor
    """Detached fp32 scalar: sum of lse_t**2 over valid tokens (coefficient not applied)."""
    logit_max: torch.Tensor
    """Detached fp32 scalar: max logit over the valid tokens' rows."""
    logit_sum: torch.Tensor
    """Detached fp32 scalar: sum of all logits of the valid tokens' rows."""
    num_valid: torch.Tensor
    """int64 scalar: number of tokens whose label is not ignore_index."""


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    z_loss_coeff: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    backend: str = "torch",
    logit_stats: bool = True,
) -> LossTerms:
    """hidden [N, D] (or [..., D]), weight [V, D], labels [N] (or [...]) -> LossTerms.

    `chunk_size` is the number of tokens per chunk of the PyTorch path and of the Liger path's
    statistics pass; Liger sizes the chunks of its loss kernel itself.
    `logit_stats=False` skips the Liger path's extra statistics pass (logit_max is then NaN and
    logit_sum comes from sum_t h_t . sum_v W_v, which is exact up to rounding).
    """
    # A head replicated over TP ranks (Trinity's TP plan with the fused loss) computes the same
    # loss on every rank: work on the local copies; their gradients stay replicated.
    hidden, weight = _local_if_replicated(hidden), _local_if_replicated(weight)
    if isinstance(hidden, DTensor) or isinstance(weight, DTensor):
        raise NotImplementedError(
            "the fused linear cross-entropy needs the full LM-head weight and local hidden states; "
            "Trinity's TP plan leaves the head whole when [kernels] fused_loss is on: do not "
            "shard the head over the vocabulary."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} hidden rows")
    return _dispatch(
        hidden, weight, labels, float(z_loss_coeff), ignore_index, chunk_size, backend, logit_stats
    )


@torch.compiler.disable
def _dispatch(hidden, weight, labels, z_loss_coeff, ignore_index, chunk_size, backend, logit_stats):
    # Eager on purpose: a Python loop over chunks (and Liger's host-side count) is not worth
    # tracing, and TorchTitan compiles the blocks, not the head.
    if use_liger(backend, hidden, weight, interpretable=True):
        return _liger_terms(
            hidden, weight, labels, z_loss_coeff, ignore_index, logit_stats, chunk_size
        )
    loss_sum, ce_sum, z_sum, logit_max, logit_sum, num_valid = _FusedLinearCrossEntropy.apply(
        hidden, weight, labels, z_loss_coeff, ignore_index, chunk_size
    )
    return LossTerms(loss_sum, ce_sum, z_sum, logit_max, logit_sum, num_valid)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[c, V] fp32 logits: the matmul in the input dtype (as nn.Linear would), then upcast."""
    return (h @ weight.t()).float()


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32; low-precision products go straight into fp32 where possible."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b.float())
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_((a @ b).float())


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The PyTorch path: gradients computed chunk by chunk in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss_coeff, ignore_index, chunk_size):
        ctx.weight_dtype = weight.dtype
        needs = ctx.needs_input_grad[:2]
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Do explicitly what autocast would do to nn.Linear: matmuls in the autocast dtype.
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                out, grad_h, grad_w = _chunked_loss_and_grads(
                    hidden.to(dtype),
                    weight.to(dtype),
                    labels,
                    z_loss_coeff,
                    ignore_index,
                    chunk_size,
                    needs,
                )
            grad_h = grad_h.to(hidden.dtype) if grad_h is not None else None
        else:
            out, grad_h, grad_w = _chunked_loss_and_grads(
                hidden, weight, labels, z_loss_coeff, ignore_index, chunk_size, needs
            )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        # Scale in fp32, then cast: the upstream gradient (1 / num_tokens) is mostly not a bf16
        # number, and rounding it first would scale every gradient by up to 1 +- 2^-9.
        scale = grad_loss.float()
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h.float() * scale).to(grad_h.dtype)
        if grad_w is not None:  # accumulated in fp32
            grad_w = (grad_w * scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def _chunked_loss_and_grads(hidden, weight, labels, z_loss_coeff, ignore_index, chunk_size, needs):
    """Loss terms, d loss_sum / d hidden and d loss_sum / d weight (fp32), chunk by chunk."""
    n, _ = hidden.shape
    device = hidden.device
    need_h, need_w = needs
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None

    valid = labels != ignore_index
    ce_sum = torch.zeros((), dtype=torch.float32, device=device)
    z_sum = torch.zeros((), dtype=torch.float32, device=device)
    logit_sum = torch.zeros((), dtype=torch.float32, device=device)
    logit_max = torch.full((), float("-inf"), dtype=torch.float32, device=device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]
        mask = valid[start:end]
        target = torch.where(mask, labels[start:end], 0)
        w_row = mask.float()

        logits = _chunk_logits(h, weight)
        row_max = logits.amax(dim=-1)
        logit_sum += (logits.sum(dim=-1) * w_row).sum()
        logit_max = torch.maximum(logit_max, row_max.masked_fill(~mask, float("-inf")).max())
        target_logit = logits.gather(1, target[:, None]).squeeze(1)
        # softmax in place: logits becomes exp(logits - max), then probabilities.
        probs = logits.sub_(row_max[:, None]).exp_()
        denom = probs.sum(dim=-1)
        lse = row_max + denom.log()
        ce_sum += ((lse - target_logit) * w_row).sum()
        z_sum += (lse.square() * w_row).sum()

        if need_h or need_w:
            # d(ce + c lse^2)/d logits = softmax * (1 + 2 c lse) - onehot(label), per valid row.
            scale = (1.0 + 2.0 * z_loss_coeff * lse) / denom * w_row
            grad_logits = probs.mul_(scale[:, None])
            grad_logits[torch.arange(end - start, device=device), target] -= w_row
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_h[start:end] = grad_logits @ weight
            if need_w:
                _accumulate_fp32(grad_w, grad_logits.t(), h)
        del logits, probs

    loss_sum = ce_sum + z_loss_coeff * z_sum
    num_valid = valid.sum()
    return (loss_sum, ce_sum, z_sum, logit_max, logit_sum, num_valid), grad_h, grad_w


@torch.no_grad()
def logit_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max logit, sum of logits, sum of lse**2) over the valid rows, chunk by chunk, fp32."""
    device = hidden.device
    logit_max = torch.full((), float("-inf"), dtype=torch.float32, device=device)
    logit_sum = torch.zeros((), dtype=torch.float32, device=device)
    z_sum = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, hidden.shape[0], chunk_size):
        mask = valid[start : start + chunk_size]
        logits = _chunk_logits(hidden[start : start + chunk_size], weight)
        w_row = mask.float()
        logit_max = torch.maximum(
            logit_max, logits.amax(dim=-1).masked_fill(~mask, float("-inf")).max()
        )
        logit_sum += (logits.sum(dim=-1) * w_row).sum()
        z_sum += (torch.logsumexp(logits, dim=-1).square() * w_row).sum()
        del logits
    return logit_max, logit_sum, z_sum


def _liger_terms(
    hidden, weight, labels, z_loss_coeff, ignore_index, logit_stats, chunk_size=1024
) -> LossTerms:
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    loss_sum, z_loss, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        None,  # bias
        None,  # ce_weight
        ignore_index,
        z_loss_coeff,  # lse_square_scale
        0.0,  # label_smoothing
        "sum",  # reduction
        None,  # softcap
        True,  # return_z_loss
        torch.float32,  # accum_dtype of the weight gradient
    )
    valid = labels != ignore_index
    # Liger's z_loss is already scaled by the coefficient (and included in its loss).
    z_scaled = z_loss.detach().float()
    ce_sum = loss_sum.detach().float() - z_scaled
    if logit_stats:
        logit_max, logit_sum, z_sum = logit_statistics(
            hidden.detach(), weight.detach(), valid, chunk_size
        )
    else:
        with torch.no_grad():
            h_sum = (hidden.detach().float() * valid[:, None]).sum(dim=0)
            logit_sum = h_sum @ weight.detach().float().sum(dim=0)
        logit_max = torch.full((), float("nan"), device=hidden.device)
        z_sum = (
            z_scaled / z_loss_coeff if z_loss_coeff > 0 else torch.full_like(z_scaled, float("nan"))
        )
    return LossTerms(loss_sum, ce_sum, z_sum, logit_max, logit_sum, valid.sum())


def _local_if_replicated(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor) and all(p.is_replicate() for p in t.placements):
        return t.to_local()
    return t
