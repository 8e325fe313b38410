"""GrassWalk and GrassJump (docs/methods.md): the basis moves at random on the Grassmannian.

This is a *reconstruction*: only the paper's abstract (arXiv:2510.01878) is available. What is known is that
the method is SubTrack++ with the tracker's rank-1 tangent replaced by a random direction, used with the
projection-aware moment policy (``moments="project"``) and recovery scaling (``recovery=True``), which its
ablation says the random updates need. Every ``update_proj_gap`` steps:

- ``grassjump``: ``S <- qr(Z).Q`` with ``Z ~ N(0, 1)`` (k x r), a fresh uniformly random subspace;
- ``grasswalk``: a random tangent ``H = (I - S S^T) Z`` scaled to ``||H||_F = 1`` and the full-rank geodesic
  step ``S <- S V cos(Sigma eta) V^T + U sin(Sigma eta) V^T`` (thin SVD ``H = U Sigma V^T``). The principal
  angles moved are ``eta * Sigma``, so the geodesic distance ``sqrt(sum theta_i^2)`` is exactly ``eta``; the
  largest principal angle (the optimizer's ``angle`` diagnostic) is smaller, of order ``eta / sqrt(r)``.

The first basis is GaLore's (SVD of the first gradient). Random numbers come from a generator seeded by (seed,
parameter index, basis number), never the global RNG: data-parallel ranks draw the same basis without
communication, and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import math

import torch

from .base import Context, Tracker, orthonormality_error, orthonormalize, seeded_generator
from .svd import SVD_DEFAULTS, svd_basis, validate_svd


def _gaussian(gn: torch.Tensor, cols: int, ctx: Context, draw: int) -> torch.Tensor:
    gen = seeded_generator(ctx, draw, gn.device)
    return torch.randn(gn.shape[0], cols, generator=gen, device=gn.device)


class GrassJumpTracker(Tracker):
    name = "grassjump"
    needs_every_gradient = False  # random moves: the gradient is read only by the initial SVD
    defaults = SVD_DEFAULTS

    def validate(self, group: dict) -> None:
        validate_svd(group)

    def init(self, gn, rank, state, group, ctx: Context):
        return svd_basis(gn, rank, group, ctx)

    def update(self, gn, state, group, ctx: Context):
        s = state.basis
        return self._move(s, _gaussian(gn, s.shape[1], ctx, state.updates + 1), group)

    def _move(self, s: torch.Tensor, z: torch.Tensor, group: dict) -> torch.Tensor:
        return orthonormalize(z)


class GrassWalkTracker(GrassJumpTracker):
    name = "grasswalk"
    #: geodesic distance moved per update (radians); same name as SubTrack's normalised step angle
    defaults = {"eta": 1.0, **SVD_DEFAULTS}

    def _eta(self, group: dict) -> float:
        eta = group.get("eta")
        return float(self.defaults["eta"] if eta is None else eta)

    def validate(self, group: dict) -> None:
        super().validate(group)
        eta = self._eta(group)
        if not 0.0 < eta <= math.pi / 2:
            raise ValueError(f"eta must be in (0, pi/2] for tracker 'grasswalk', got {eta}")

    def _move(self, s, z, group):
        eta = self._eta(group)
        h = z - s @ (s.mT @ z)
        h = h / torch.linalg.matrix_norm(h)
        # V, Sigma from the r x r Gram H^T H = V Sigma^2 V^T; U sin(Sigma eta) = H V sin(Sigma eta) / Sigma (a
        # sinc): half the cost of an SVD of H, and no division by the zero singular values H has when k < 2r
        evals, v = torch.linalg.eigh((h.mT @ h).double())
        sigma = evals.clamp_min(0.0).sqrt()
        cos, sinc = torch.cos(sigma * eta).float(), (eta * torch.sinc(sigma * eta / math.pi)).float()
        v = v.float()
        new = ((s @ v) * cos + (h @ v) * sinc) @ v.mT
        if orthonormality_error(new) > 1e-4:
            new = orthonormalize(new)
        return new.contiguous()
