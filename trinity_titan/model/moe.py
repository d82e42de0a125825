"""Trinity's sparse MoE: sigmoid router with expert bias, grouped SwiGLU experts, one shared expert.

The classes subclass TorchTitan's MoE components so that TorchTitan's expert-parallel, tensor-parallel,
FSDP and torch.compile code applies to them unchanged (it keys on these types and attribute names:
`router.gate`, `reorderer`, `experts.w1/w2/w3`, `shared_experts`, `expert_bias`, `tokens_per_expert`).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torchtitan.models.moe.moe import (
    FeedForward,
    GroupedExperts,
    MoE,
    MoEArgs,
    TokenChoiceTopKRouter,
)
from torchtitan.models.moe.utils import indices_padding_wrapper

from trinity_titan.compat.cpu import CpuSafeTokenReorderer
from trinity_titan.kernels import silu_mul
from trinity_titan.model.args import TrinityModelArgs
from trinity_titan.model.balance_loss import BalanceLossLayout, add_aux_loss, sequence_balance_loss
from trinity_titan.model.init import trunc_normal_3sigma_


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` computes in: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def count_tokens(selected_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert as int64, without a host sync (torch.histc has no int64 CPU kernel)."""
    flat = selected_experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


class TrinityFeedForward(FeedForward):
    """SwiGLU w2(silu(w1 x) * w3 x): the dense FFN of the first layers and the shared expert."""

    def __init__(self, dim: int, hidden_dim: int, backend: str = "torch") -> None:
        super().__init__(dim, hidden_dim)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchTitan's forward with its fixed F.silu(w1 x) * w3 x replaced by the kernel backend's.
        return self.w2(silu_mul(self.w1(x), self.w3(x), self.backend))

    def init_weights(self, init_std: float) -> None:
        for linear in (self.w1, self.w2, self.w3):
            trunc_normal_3sigma_(linear.weight, init_std)


class TrinityRouter(TokenChoiceTopKRouter):
    """Sigmoid scores in fp32; top-k on scores + bias; gates = normalised top-k scores * route_scale.

    The bias only steers the choice; the gates come from the unbiased scores. The forward is
    Trinity's own: it also returns the scores (for the balance loss) and counts without histc.
    """

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (gates [T, k], selected [T, k], tokens per expert [E] int64, scores [T, E])."""
        scores = torch.sigmoid(self.gate(x).to(torch.float32))
        choice = scores if expert_bias is None else scores + expert_bias
        _, selected = torch.topk(choice, k=self.top_k, dim=-1)
        top = scores.gather(dim=1, index=selected)
        gates = top / (top.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale
        return gates, selected, count_tokens(selected, self.num_experts), scores

    def init_weights(self, init_std: float) -> None:
        trunc_normal_3sigma_(self.gate.weight, init_std)


class TrinityExperts(GroupedExperts):
    """Routed experts as 3-D weights: w1 (gate) [E, I, d], w2 (down) [E, d, I], w3 (up) [E, I, d].

    Same contract as TorchTitan's GroupedExperts (tokens sorted by expert, counts per expert;
    under expert parallelism the weights are DTensors and the tokens already padded), with the
    SwiGLU activation from `trinity_titan.kernels` so Liger's kernel can serve it. The forward is
    Trinity's own because TorchTitan's fixes both the activation and the per-expert helpers.
    """

    def __init__(
        self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool, backend: str
    ) -> None:
        super().__init__(dim, hidden_dim, num_experts, use_grouped_mm)
        self.backend = backend

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.w1, self.w2, self.w3
        expert_parallel = isinstance(w1, DTensor) and "ep" in w1.device_mesh.mesh_dim_names
        if isinstance(w1, DTensor):
            # Token groups have data-dependent sizes: compute on the local expert shards.
            w1, w2, w3 = w1.to_local(), w2.to_local(), w3.to_local()
        if not self.use_grouped_mm:
            return self._per_expert_loop(w1, w2, w3, x, num_tokens_per_expert)
        if expert_parallel:  # the all-to-all dispatch already padded each group
            return self._grouped_mm(w1, w2, w3, x, num_tokens_per_expert)
        return indices_padding_wrapper(self._grouped_mm)(w1, w2, w3, x, num_tokens_per_expert)

    def _swiglu(self, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, mm) -> torch.Tensor:
        return silu_mul(mm(x, w1), mm(x, w3), self.backend)

    def _grouped_mm(self, w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
        """torch._grouped_mm over contiguous token groups, in the matmul dtype of `x`.

        That dtype is autocast's where autocast is on (torch does not autocast _grouped_mm),
        else the input's: fp32 stays fp32, bf16 (FSDP's mixed precision) stays bf16.
        The kernel leaves rows past the last group unwritten, in its output and in its input
        gradient. Those rows are padding, which TorchTitan's dispatch fills with zeros
        (`_permute`), so the last group is extended over them: SwiGLU maps a zero row to a
        zero row, with zero gradients, at no extra pass over the activations.
        """
        dtype = matmul_dtype(x)
        offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        offsets[-1] = x.shape[0]

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            # Cast per call, as autocast does: the two input gradients of x then add in fp32.
            return torch._grouped_mm(a.to(dtype), w.to(dtype).transpose(-2, -1), offs=offsets)

        return mm(self._swiglu(x, w1, w3, mm), w2)

    def _per_expert_loop(self, w1, w2, w3, x, num_tokens_per_expert) -> torch.Tensor:
        """One matmul triple per expert (host sync on the counts); exact in any dtype.

        The weights are unbound once: indexing `w[e]` per expert would give each expert a
        backward that writes a zero gradient of all E experts (O(E^2) memory traffic, 30x the
        whole step at Nano's 128 experts on a CPU).
        """
        counts = num_tokens_per_expert.tolist()
        used = sum(counts)
        outs = []
        experts = zip(w1.unbind(0), w2.unbind(0), w3.unbind(0), strict=True)
        for (w1e, w2e, w3e), xe in zip(experts, torch.split(x[:used], counts, dim=0), strict=True):
            h = self._swiglu(xe, w1e, w3e, lambda a, w: a @ w.transpose(-2, -1))
            outs.append(h @ w2e.transpose(-2, -1))
        # Rows past the counted tokens are padding (expert parallel): their output is zero.
        outs.append(x.new_zeros((x.shape[0] - used, w2.shape[1]), dtype=matmul_dtype(x)))
        return torch.cat(outs, dim=0)

    def init_weights(self, init_std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            trunc_normal_3sigma_(w, init_std)


@torch.compiler.disable
def in_first_forward() -> bool:
    """True in a training forward, False under no_grad and in an activation-checkpoint recompute.

    A recompute runs inside the autograd engine (backward), which is what the graph task id tells.
    Statistics recorded in the forward use this so that each token is counted exactly once.
    """
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


class TrinityMoE(MoE):
    """y = shared(x) + sum_k gate_k * expert_k(x), routed by `TrinityRouter`.

    Built by TorchTitan's `MoE.__init__` (so every attribute TorchTitan's parallel code reads is
    TorchTitan's own), with Trinity's router, experts and shared expert in place of its defaults.
    `expert_bias` (fp32 buffer, not trained by gradients) is updated before each optimizer step
    from `tokens_per_expert` by trinity_titan.training.expert_bias; SMEBU keeps its momentum in
    `expert_bias_momentum` so that it is checkpointed with the model. With `balance_loss_coeff`
    > 0 the sequence-wise balance loss is added to the training objective through the backward
    of the output (model/balance_loss.py), laid out by `set_balance_loss_layout`.
    """

    def __init__(self, args: TrinityModelArgs) -> None:
        num_experts = args.num_experts
        super().__init__(
            MoEArgs(
                num_experts=num_experts,
                num_shared_experts=args.num_shared_experts,
                score_func="sigmoid",
                route_norm=True,
                route_scale=args.route_scale,
                score_before_experts=False,
                top_k=args.top_k,
                use_grouped_mm=args.use_grouped_mm,
                # TorchTitan registers `expert_bias` only with a coefficient; Trinity's own update
                # (training/expert_bias.py) reads the flavor's settings, not this field.
                load_balance_coeff=args.balance_gamma,
            ),
            dim=args.dim,
            hidden_dim=args.moe_hidden_dim,
        )
        # Trinity's modules replace TorchTitan's defaults, registered in the model's own order
        # (router, reorderer, experts, shared expert): the parameter order fixes the optimizer's
        # and the gradient norm's summation order, and so keeps runs bitwise reproducible.
        for name in ("router", "reorderer", "experts", "shared_experts"):
            delattr(self, name)
        self.router = TrinityRouter(
            dim=args.dim,
            num_experts=num_experts,
            num_expert_groups=None,
            num_limited_groups=None,
            top_k=args.top_k,
            score_func="sigmoid",
            route_norm=True,
            route_scale=args.route_scale,
            gate_bias=False,
        )
        self.reorderer = CpuSafeTokenReorderer(num_experts=num_experts, top_k=args.top_k)
        self.experts = TrinityExperts(
            dim=args.dim,
            hidden_dim=args.moe_hidden_dim,
            num_experts=num_experts,
            use_grouped_mm=args.use_grouped_mm,
            backend=args.kernel_backend,
        )
        self.shared_experts = TrinityFeedForward(
            args.dim, args.moe_hidden_dim * args.num_shared_experts, backend=args.kernel_backend
        )
        self.balance_loss_coeff = args.balance_loss_coeff
        self.balance_layout = BalanceLossLayout()
        self.register_buffer(
            "expert_bias_momentum", torch.zeros(num_experts, dtype=torch.float32), persistent=True
        )
        # Sum of the (weighted) balance-loss values of the step's forwards, for logging.
        self.register_buffer(
            "balance_loss_sum", torch.zeros((), dtype=torch.float32), persistent=False
        )

    def set_balance_loss_layout(self, layout: BalanceLossLayout) -> None:
        """The parallelizer's description of how this layer's balance loss spans ranks."""
        self.balance_layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        top_k = self.router.top_k
        x = x.view(-1, dim)
        gates, selected, counts, scores = self.router(x, self.expert_bias)
        first_forward = in_first_forward()
        if first_forward:
            with torch.no_grad():
                self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))

        gates_sorted, token_indices_sorted, num_tokens_per_expert = self.reorderer(gates, selected)
        routed_output = self.experts(x[token_indices_sorted // top_k], num_tokens_per_expert)
        # The shared expert runs while the routed tokens are in flight under expert parallelism.
        shared = self.shared_experts(x)

        unsorted = routed_output.new_zeros((bs * slen * top_k, dim))
        unsorted[token_indices_sorted] = routed_output
        routed = torch.bmm(gates.view(-1, 1, top_k), unsorted.view(-1, top_k, dim).float()).squeeze(
            1
        )
        out = (shared + routed.to(x.dtype)).view(bs, slen, dim)
        if self.balance_loss_coeff and torch.is_grad_enabled():
            layout = self.balance_layout
            per_seq = sequence_balance_loss(
                scores.view(bs, slen, -1),
                selected.view(bs, slen, top_k),
                reduce_hits=layout.reduce_hits,
            )
            weight = layout.seq_weight or 1.0 / bs
            aux = self.balance_loss_coeff * weight * per_seq.sum()
            if first_forward:
                self.balance_loss_sum.add_(aux.detach())
            out = add_aux_loss(out, aux, layout.grad_scale)
        return out

    def init_weights(self, init_std: float, buffer_device: torch.device | None = None) -> None:
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std)
        self.shared_experts.init_weights(init_std)
        device = buffer_device if buffer_device is not None else self.expert_bias.device
        with torch.device(device):
            self.expert_bias = torch.zeros(self.experts.num_experts, dtype=torch.float32)
            self.expert_bias_momentum = torch.zeros(self.experts.num_experts, dtype=torch.float32)
            self.tokens_per_expert = torch.zeros(self.experts.num_experts, dtype=torch.float32)
            self.balance_loss_sum = torch.zeros((), dtype=torch.float32)
