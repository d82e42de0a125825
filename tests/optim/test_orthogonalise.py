"""Single-process pieces of the sharded orthogonalisation: Newton-Schulz and the owner choice."""

from __future__ import annotations

from trinity_titan.optim.orthogonalise import _assign_owners, _Matrix, chunk_sizes

KJ = (3.4445, -4.7750, 2.0315)


def test_owners_split_the_work():
    """Greedy owners balance Newton-Schulz cost: no rank orthogonalises every matrix."""
    matrices = [_Matrix(i, None, 0, (128, 128), [64, 64]) for i in range(6)]
    matrices += [_Matrix(6 + i, None, 0, (64, 128), [32, 32]) for i in range(4)]
    _assign_owners(matrices, 2)
    owners = [m.owner for m in matrices]
    assert owners.count(0) == owners.count(1) == 5, owners
    assert chunk_sizes(7, 2) == [4, 3] and chunk_sizes(3, 4) == [1, 1, 1, 0]
