"""The oriented projection, written once.

Every method keeps an orthonormal basis ``S`` (k x r) of one side of a weight ``W`` (m x n). We call the gradient
seen from that side the *oriented* gradient ``Gn`` (k x l): ``G`` itself when the basis is on the left (rows),
``G^T`` (a view, no copy) when it is on the right (columns). In the oriented frame every method is the left-basis
case of the common step in docs/methods.md:

    Gt = S^T Gn        (r x l)   projected gradient
    Un = S Ot          (k x l)   inner rule output back in the full space

and ``U = Un`` or ``Un^T``. Trackers, moment policies and inner rules only ever see the oriented frame.
"""

from __future__ import annotations

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def basis_on_right(shape: tuple[int, int], proj_type: str) -> bool:
    """Whether the basis spans the columns (``G S``) rather than the rows (``S^T G``) of an m x n weight.

    ``std`` projects the smaller side; like galore-torch, a square weight (m == n) uses the right side, so that
    results match the reference package. ``reverse_std`` projects the larger side.
    """
    m, n = shape
    if proj_type in ("std", "full"):
        return m >= n
    if proj_type == "reverse_std":
        return m < n
    if proj_type == "left":
        return False
    if proj_type == "right":
        return True
    raise ValueError(f"unknown proj_type {proj_type!r}; choose one of {', '.join(PROJ_TYPES)}")


def oriented(g: torch.Tensor, right: bool) -> torch.Tensor:
    """The gradient in the oriented frame (a view: no copy)."""
    return g.mT if right else g


def project(basis: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
    """``S^T Gn``, computed in the basis dtype (float32) whatever the gradient dtype."""
    return basis.mT @ gn.to(basis.dtype)


def project_back(basis: torch.Tensor, ot: torch.Tensor, right: bool) -> torch.Tensor:
    """``S Ot`` mapped back to the weight's own layout."""
    un = basis @ ot.to(basis.dtype)
    return un.mT if right else un


def add_back(
    p: torch.Tensor, basis: torch.Tensor, ot: torch.Tensor, right: bool, alpha: float, rows: slice | None = None
) -> None:
    """``p += alpha * (S Ot)`` in the weight's layout, fused into one ``addmm_`` (no full-size temporary) when the
    weight has the basis dtype. ``rows``: ``p`` holds only these rows of the weight (an FSDP2 shard) while ``S Ot``
    is the full update."""
    if rows is not None:
        basis, ot = (basis, ot[:, rows]) if right else (basis[rows], ot)
    ot = ot.to(basis.dtype)
    if p.dtype != basis.dtype:
        p.add_(project_back(basis, ot, right), alpha=alpha)
    elif right:
        p.addmm_(ot.mT, basis.mT, alpha=alpha)
    else:
        p.addmm_(basis, ot, alpha=alpha)


def largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest principal angle (radians) between the spans of two orthonormal bases (ranks may differ)."""
    c = a.mT.float() @ b.float()
    s = torch.linalg.svdvals(c)
    k = min(a.shape[1], b.shape[1])
    return torch.arccos(s[:k].min().clamp(-1.0, 1.0))
