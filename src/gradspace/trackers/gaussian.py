"""APOLLO's tracker (arXiv:2412.05270): a random Gaussian projection, redrawn every ``update_proj_gap`` steps.

The k x r matrix ``P`` has entries ``N(0, 1/r)`` and is *not* orthonormalised: ``E[P P^T] = I``, so ``P^T Gn``
keeps the gradient's column norms in expectation, which is all APOLLO's scaled-gradient output
(``gradspace.update``) needs from it. It reads no gradient, so a redraw costs one ``randn`` of k x r numbers.

Each draw comes from a generator seeded by (optimizer seed, parameter index, draw number), never the global RNG:
data-parallel ranks draw the same matrix without communication, and a resumed run draws what the uninterrupted
one would have. The matrix is *stored* in the state (float32, ``4 k r`` bytes, like every basis) rather than
regenerated each step: that is 4k bytes for APOLLO-Mini's rank 1, it keeps checkpoints self-contained, and a
run resumed on another device type (whose generator streams differ) continues with the same projection.
"""

from __future__ import annotations

import math

import torch

from .base import Context, Tracker, seeded_generator


class GaussianTracker(Tracker):
    name = "gaussian"
    needs_every_gradient = False  # the gradient is never read
    orthonormal = False

    def init(self, gn, rank, state, group, ctx: Context):
        return self.draw(gn.shape[0], rank, ctx, 0, gn.device)

    def update(self, gn, state, group, ctx: Context):
        return self.draw(gn.shape[0], state.basis.shape[1], ctx, state.updates + 1, gn.device)

    @staticmethod
    def draw(k: int, rank: int, ctx: Context, number: int, device: torch.device) -> torch.Tensor:
        """The ``number``-th projection of parameter ``ctx.index`` (0 = the first): k x rank, N(0, 1/rank)."""
        if device.type == "meta":  # shapes only (gradspace.bench memory counts state on the meta device)
            return torch.empty(k, rank, device=device)
        gen = seeded_generator(ctx, number, device)
        return torch.randn(k, rank, generator=gen, device=device).div_(math.sqrt(rank))
