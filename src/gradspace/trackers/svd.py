"""GaLore's tracker: the top-r singular vectors of the current gradient, every ``update_proj_gap`` steps."""

from __future__ import annotations

import logging

import torch

from .base import Context, Tracker

log = logging.getLogger(__name__)


def top_singular_basis(gn: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """Top-``rank`` left singular vectors of the oriented gradient ``gn`` (k x rank, float32).

    The SVD is taken of the weight's gradient in its own layout (``gn^T`` when the basis is on the right): an SVD
    of the transposed matrix is mathematically the same but returns other signs, and galore-torch parity needs the
    same signs. If LAPACK fails to converge, fall back to an eigensolve of the smaller Gram matrix instead of
    crashing a long run.
    """
    g = gn.detach().float()
    try:
        if right:
            _, _, vh = torch.linalg.svd(g.mT, full_matrices=False)
            return vh[:rank].mT.contiguous()
        u, _, _ = torch.linalg.svd(g, full_matrices=False)
        return u[:, :rank].contiguous()
    except (RuntimeError, torch.linalg.LinAlgError) as err:  # pragma: no branch - exercised by a test
        log.warning("SVD failed (%s); falling back to an eigendecomposition of the Gram matrix", err)
        return gram_eigen_basis(g, rank)


def gram_eigen_basis(g: torch.Tensor, rank: int) -> torch.Tensor:
    """Top eigenvectors of ``g g^T`` in float64: the left singular vectors without an SVD."""
    gram = g.double() @ g.double().mT
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -rank:].flip(-1).to(g.dtype).contiguous()


class SVDTracker(Tracker):
    name = "svd"
    needs_every_gradient = False

    def init(self, gn, rank, state, group, ctx: Context):
        return top_singular_basis(gn, rank, ctx.right)

    def update(self, gn, state, group, ctx: Context):
        return top_singular_basis(gn, state["basis"].shape[1], ctx.right)
