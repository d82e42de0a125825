"""Subprocess worker: the project's Liger fused loss on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be on before triton and liger-kernel are imported, so the test runs this
script in a fresh interpreter: `python liger_interpreter_worker.py INPUTS OUTPUTS`. INPUTS (from
torch.save) holds the tensors and the cases; OUTPUTS gets, per case, the LossTerms, the gradients
of loss_sum for an upstream gradient `upstream`, and the name of loss_sum's grad_fn; plus what
RMSNorm and SwiGLU do with backend "liger" on CPU (they must keep the PyTorch path).
"""

from __future__ import annotations

import sys

import torch


def main(inputs_path: str, outputs_path: str) -> None:
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    from trinity_titan.kernels import fused_linear_cross_entropy, rms_norm, silu_mul
    from trinity_titan.kernels.backend import triton_interpreter

    inputs = torch.load(inputs_path)
    upstream = torch.tensor(inputs["upstream"])
    results = []
    for case in inputs["cases"]:
        data = inputs["data"][case["dtype"]]
        hidden = data["hidden"].clone().requires_grad_()
        weight = data["weight"].clone().requires_grad_()
        terms = fused_linear_cross_entropy(
            hidden,
            weight,
            data["labels"],
            z_loss_coeff=case["z"],
            chunk_size=case["chunk_size"],
            backend="liger",
            logit_stats=case["logit_stats"],
        )
        grad_h, grad_w = torch.autograd.grad(
            terms.loss_sum, (hidden, weight), grad_outputs=upstream
        )
        results.append(
            dict(
                terms={k: v.detach() for k, v in terms._asdict().items()},
                grad_hidden=grad_h,
                grad_weight=grad_w,
                grad_fn=type(terms.loss_sum.grad_fn).__name__,
            )
        )

    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(16)
    norm = rms_norm(x, w, 1e-5, backend="liger")
    gate, up = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16)
    swiglu = silu_mul(gate, up, "liger")
    torch.save(
        dict(
            results=results,
            interpreter_on=triton_interpreter(),
            kernel_type=type(liger_cross_entropy_kernel).__name__,
            norm_is_torch=torch.equal(norm, rms_norm(x, w, 1e-5, backend="torch")),
            norm_grad_fn=type(norm.grad_fn).__name__,
            swiglu_is_torch=torch.equal(swiglu, silu_mul(gate, up, "torch")),
            swiglu_grad_fn=type(swiglu.grad_fn).__name__,
        ),
        outputs_path,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
