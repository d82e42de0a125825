"""Newton-Schulz orthogonalisation of Muon updates on sharded weights, with explicit collectives.

Distributed (parameters are DTensors; every update equals single-device Muon on the full matrix):
- Momentum, weight decay and AdamW are elementwise: each rank updates its local shard, no comm.
- A matrix whose matrix dimensions are not split on any mesh dimension (for example routed
  experts [E, out, in] split only on the expert dim by EP and by FSDP's Shard(0) on "efsdp") is
  orthogonalised where it lies: no communication at all.
- A matrix split along one of its matrix dimensions on one mesh dimension (FSDP/HSDP Shard(0) of
  a 2-D weight; experts that FSDP shards on dim 1 when efsdp * ep > num_experts) is given an
  owner rank in that shard group (greedy by Newton-Schulz cost, so the work is split across the
  group). One all_to_all_single sends every shard to its matrix's owner, the owner stacks the
  matrices of equal shape and runs Newton-Schulz on the batch, and a second all_to_all_single
  sends the orthogonalised shards back. Per step and rank that is one all_to_all per direction
  and shard group, carrying about the rank's local shard of the Muon matrices (the same bytes
  as one FSDP all-gather plus one reduce-scatter of those weights, in their fp32 dtype).
  Replicated mesh dimensions (HSDP's replicas) repeat the owner's work and need no comm.
- A matrix split on two mesh dimensions (FSDP + TP: FSDP's Shard or _StridedShard on the outer
  dimension, TP's Shard on the inner one) is first all-gathered over the inner (TP) group. Each
  rank then holds a set of whole rows (or columns) of the matrix, and these sets partition it
  across the outer (FSDP) group, in an order that is a permutation of the matrix's. The owner
  scheme above runs on them: Newton-Schulz is equivariant under row and column permutations
  (NS(P X Q) = P NS(X) Q), so the owner's result is the permuted orthogonalised matrix, and each
  rank keeps its own TP slice of what comes back. The work is split over the FSDP group and
  repeated by the TP ranks; the TP all-gather moves the rank's shard times the TP degree.
- Any other layout falls back to DTensor's full_tensor on every rank of the mesh: correct, but
  every rank does the work.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torchtitan.config import TORCH_DTYPE_MAP

from trinity_titan.compat.collectives import all_gather_single


def newton_schulz(
    g: Tensor,
    coefficients: Sequence[float],
    steps: int,
    eps: float,
    dtype: torch.dtype | str,
) -> Tensor:
    """Orthogonalise each matrix of `g` ([..., m, n]) with the quintic Newton-Schulz iteration
    (coefficients, steps, eps and dtype: `[optimizer] ns_*`)."""
    a, b, c = coefficients
    x = g.to(TORCH_DTYPE_MAP[dtype] if isinstance(dtype, str) else dtype)
    transpose = g.size(-2) > g.size(-1)
    if transpose:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if transpose:
        x = x.mT
    return x.to(g.dtype)


@dataclass
class MuonUpdate:
    """One parameter's Muon update before orthogonalisation."""

    param: Tensor
    group: dict  # its optimizer param group (the ns_* settings)
    update: Tensor  # local shard of the momentum update, the parameter's local shape


@dataclass(frozen=True)
class _Split:
    """How a DTensor update is laid out for Newton-Schulz."""

    kind: str  # "local" | "owner" | "gather_owner" | "full"
    mesh_dim: int = -1  # owner: mesh dimension whose group holds the pieces of each matrix
    dim: int = -1  # owner: tensor dimension split across that group
    gather_mesh_dim: int = -1  # gather_owner: mesh dimension all-gathered first (TP)
    gather_dim: int = -1  # gather_owner: tensor dimension split across that one


def layout(p: Tensor) -> _Split:
    """Classify a parameter's sharding: local, one sharded matrix dim (owner), two (gather, then
    owner), or other (full)."""
    if not isinstance(p, DTensor):
        return _Split("local")
    splits = []
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_replicate() or p.device_mesh.size(mesh_dim) == 1:
            continue
        if not isinstance(placement, Shard | _StridedShard):
            return _Split("full")
        if placement.dim == 0 and p.ndim == 3:
            continue  # the expert (batch) dim: each rank holds whole matrices
        splits.append((mesh_dim, placement))
    if not splits:
        return _Split("local")
    if len(splits) == 1:
        mesh_dim, placement = splits[0]
        if type(placement) is Shard:
            return _Split("owner", mesh_dim, placement.dim)
        return _Split("full")
    if len(splits) == 2 and type(splits[1][1]) is Shard:
        (outer, outer_p), (inner, inner_p) = splits
        return _Split("gather_owner", outer, outer_p.dim, inner, inner_p.dim)
    return _Split("full")


def orthogonalise_all(work: list[MuonUpdate]) -> list[Tensor]:
    """Newton-Schulz of every update, each equal to running it on the full matrix."""
    results: list[Tensor | None] = [None] * len(work)
    local_idx: list[int] = []
    by_group: dict[tuple, list[tuple[int, _Split]]] = defaultdict(list)
    for i, w in enumerate(work):
        split = layout(w.param)
        if split.kind == "local":
            local_idx.append(i)
        elif split.kind in ("owner", "gather_owner"):
            mesh = w.param.device_mesh
            groups = [mesh.get_group(split.mesh_dim)]
            if split.kind == "gather_owner":
                groups.append(mesh.get_group(split.gather_mesh_dim))
            key = tuple(tuple(dist.get_process_group_ranks(g)) for g in groups)
            by_group[(key, *groups)].append((i, split))
        else:
            results[i] = _orthogonalise_full(w)
    for i, out in zip(local_idx, _ns_batched([work[i] for i in local_idx]), strict=True):
        results[i] = out
    for (_, group, *gather_group), members in by_group.items():
        if gather_group:
            outs = _orthogonalise_gathered(work, members, group, gather_group[0])
        else:
            world = dist.get_world_size(group)
            outs = _orthogonalise_owned([_unit(work[i], s.dim, world) for i, s in members], group)
        for (i, _), out in zip(members, outs, strict=True):
            results[i] = out
    return results  # type: ignore[return-value]


def _ns_batched(work: list[MuonUpdate], mats: list[Tensor] | None = None) -> list[Tensor]:
    """Newton-Schulz on `mats` ([..., m, n] each), stacking equal shapes of a group into one batch."""
    mats = [w.update for w in work] if mats is None else mats
    out: list[Tensor | None] = [None] * len(mats)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (w, m) in enumerate(zip(work, mats, strict=True)):
        g = w.group
        key = (tuple(m.shape[-2:]), m.dtype, g["ns_steps"], g["ns_coefficients"], g["ns_eps"])
        buckets[key + (g["ns_dtype"],)].append(i)
    for key, idx in buckets.items():
        (_, _, steps, coeffs, eps, ns_dtype) = key
        batch = torch.cat([mats[i].reshape(-1, *mats[i].shape[-2:]) for i in idx])
        ortho = newton_schulz(batch, coeffs, steps, eps, ns_dtype)
        offset = 0
        for i in idx:
            n = mats[i].numel() // (mats[i].shape[-2] * mats[i].shape[-1])
            out[i] = ortho[offset : offset + n].reshape(mats[i].shape)
            offset += n
    return out  # type: ignore[return-value]


def _orthogonalise_full(w: MuonUpdate) -> Tensor:
    p = w.param
    full = DTensor.from_local(
        w.update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
    ).full_tensor()
    ortho = _ns_batched([w], [full])[0]
    return distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()


def chunk_sizes(length: int, world: int) -> list[int]:
    """Shard sizes of torch.chunk (what DTensor's and FSDP2's Shard use): ceil-sized, tail short."""
    size = -(-length // world)
    return [max(0, min(size, length - r * size)) for r in range(world)]


@dataclass
class _Unit:
    """This rank's piece of one (possibly batched) matrix split along `dim` across a group."""

    work: MuonUpdate  # for the group's Newton-Schulz settings
    piece: Tensor  # [m_r, n], [m, n_r], or [E, ...] with `dim` in 1..2
    dim: int  # the tensor dimension split across the group
    sizes: list[int]  # the pieces' sizes along `dim`, by group rank


def _unit(work: MuonUpdate, dim: int, world: int) -> _Unit:
    """The local update of a parameter split like DTensor's Shard(dim) (torch.chunk sizes)."""
    return _Unit(work, work.update, dim, chunk_sizes(work.param.shape[dim], world))


@dataclass
class _Matrix:
    """One matrix of a unit: unit index, batch index (None for 2-D), split dim, full shape."""

    index: int
    batch: int | None
    dim: int  # 0 or 1, the matrix dimension split across the group
    shape: tuple[int, int]  # full matrix shape
    sizes: list[int]  # piece sizes along `dim`, by group rank
    owner: int = 0


def _orthogonalise_owned(units: list[_Unit], group: dist.ProcessGroup) -> list[Tensor]:
    """Gather each matrix to one owner rank of `group`, orthogonalise there, scatter back.

    The owner concatenates the pieces in rank order. Where that is a permutation of the
    matrix's rows or columns (after a TP gather), the result is the same permutation of the
    orthogonalised matrix, and each rank gets back its own rows or columns."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    matrices: list[_Matrix] = []
    for i, u in enumerate(units):
        shape = list(u.piece.shape)
        shape[u.dim] = sum(u.sizes)
        if u.piece.ndim == 2:
            matrices.append(_Matrix(i, None, u.dim, tuple(shape), u.sizes))
        else:
            matrices += [
                _Matrix(i, b, u.dim - 1, tuple(shape[1:]), u.sizes) for b in range(shape[0])
            ]
    _assign_owners(matrices, world)

    def piece(m: _Matrix) -> Tensor:
        u = units[m.index].piece
        return u if m.batch is None else u[m.batch]

    def numel(m: _Matrix, r: int) -> int:
        return m.sizes[r] * m.shape[1 - m.dim]

    like = units[0].piece
    mine = [m for m in matrices if m.owner == rank]

    # 1. shards -> owners
    send = [[piece(m).reshape(-1) for m in matrices if m.owner == r] for r in range(world)]
    recv_sizes = [[numel(m, src) for m in mine] for src in range(world)]
    received = _all_to_all(send, recv_sizes, like, group)

    full_mats = []
    for k, m in enumerate(mine):
        parts = []
        for src in range(world):
            shape = list(m.shape)
            shape[m.dim] = m.sizes[src]
            parts.append(received[src][k].view(shape))
        full_mats.append(torch.cat(parts, dim=m.dim))
    ortho = _ns_batched([units[m.index].work for m in mine], full_mats)

    # 2. orthogonalised shards -> their ranks
    send = []
    for dst in range(world):
        row = []
        for m, o in zip(mine, ortho, strict=True):
            start = sum(m.sizes[:dst])
            row.append(o.narrow(m.dim, start, m.sizes[dst]).reshape(-1))
        send.append(row)
    owners = [[m for m in matrices if m.owner == src] for src in range(world)]
    recv_sizes = [[numel(m, rank) for m in owners[src]] for src in range(world)]
    received = _all_to_all(send, recv_sizes, like, group)

    results = [torch.empty_like(u.piece) for u in units]
    for src in range(world):
        for m, flat in zip(owners[src], received[src], strict=True):
            target = results[m.index] if m.batch is None else results[m.index][m.batch]
            target.copy_(flat.view(target.shape))
    return results


def _orthogonalise_gathered(
    work: list[MuonUpdate],
    members: list[tuple[int, _Split]],
    group: dist.ProcessGroup,
    gather_group: dist.ProcessGroup,
) -> list[Tensor]:
    """Matrices split over two mesh dims: all-gather over `gather_group` (TP), run the owner
    scheme over `group` (FSDP) on the gathered rows or columns, keep this rank's TP slice.

    Per step and group: one all-gather of every matrix's piece (padded to the largest TP
    piece), two tiny all-gathers of piece sizes, and the owner scheme's two all_to_alls."""
    t_world, t_rank = dist.get_world_size(gather_group), dist.get_rank(gather_group)
    f_world = dist.get_world_size(group)
    updates = [work[i].update for i, _ in members]
    # piece sizes along the TP-split dim, by TP rank and matrix
    local_sizes = torch.tensor(
        [u.shape[s.gather_dim] for u, (_, s) in zip(updates, members, strict=True)]
    )
    t_sizes = _all_gather_rows(local_sizes, gather_group).tolist()
    padded = []
    for k, (u, (_, s)) in enumerate(zip(updates, members, strict=True)):
        pad = list(u.shape)
        pad[s.gather_dim] = max(t_sizes[r][k] for r in range(t_world)) - u.shape[s.gather_dim]
        padded.append(
            torch.cat((u, u.new_zeros(pad)), dim=s.gather_dim) if pad[s.gather_dim] else u
        )
    flat = torch.cat([t.reshape(-1) for t in padded])
    everyone = flat.new_empty(t_world * flat.numel())
    all_gather_single(everyone, flat, group=gather_group)
    by_rank = everyone.view(t_world, -1).split([t.numel() for t in padded], dim=1)
    gathered = []
    for k, (t, (_, s)) in enumerate(zip(padded, members, strict=True)):
        parts = by_rank[k].reshape(t_world, *t.shape)
        gathered.append(
            torch.cat(
                [parts[r].narrow(s.gather_dim, 0, t_sizes[r][k]) for r in range(t_world)],
                dim=s.gather_dim,
            )
        )
    # the gathered pieces' sizes along the FSDP-split dim, by FSDP rank and matrix
    g_sizes = torch.tensor([g.shape[s.dim] for g, (_, s) in zip(gathered, members, strict=True)])
    f_sizes = _all_gather_rows(g_sizes, group).tolist()
    units = [
        _Unit(work[i], g, s.dim, [f_sizes[r][k] for r in range(f_world)])
        for k, ((i, s), g) in enumerate(zip(members, gathered, strict=True))
    ]
    outs = _orthogonalise_owned(units, group)
    return [
        o.narrow(s.gather_dim, sum(t_sizes[r][k] for r in range(t_rank)), t_sizes[t_rank][k])
        for k, (o, (_, s)) in enumerate(zip(outs, members, strict=True))
    ]


def _all_gather_rows(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """all_gather of a small 1-D int tensor: [group size, len(x)]."""
    world = dist.get_world_size(group)
    out = x.new_empty(world * x.numel())
    all_gather_single(out, x.reshape(-1).contiguous(), group=group)
    return out.view(world, -1)


def _assign_owners(matrices: list[_Matrix], world: int) -> None:
    """Greedy balance of Newton-Schulz cost (m n min(m, n)); identical on every rank."""
    load = [0] * world
    for m in sorted(matrices, key=lambda m: -m.shape[0] * m.shape[1] * min(m.shape)):
        m.owner = min(range(world), key=lambda r: (load[r], r))
        load[m.owner] += m.shape[0] * m.shape[1] * min(m.shape)


def _all_to_all(
    send: list[list[Tensor]],
    recv_sizes: list[list[int]],
    like: Tensor,
    group: dist.ProcessGroup,
) -> list[list[Tensor]]:
    """all_to_all_single of per-destination lists of flat tensors; returns per-source lists."""
    send_sizes = [sum(t.numel() for t in row) for row in send]
    flat = [t for row in send for t in row]
    inp = torch.cat(flat) if flat else like.new_empty(0)
    out = like.new_empty(sum(map(sum, recv_sizes)))
    dist.all_to_all_single(out, inp, list(map(sum, recv_sizes)), send_sizes, group=group)
    rows = out.split(list(map(sum, recv_sizes)))
    return [list(row.split(sizes)) for row, sizes in zip(rows, recv_sizes, strict=True)]
