"""SubTrack-Grad: move the basis along a Grassmannian geodesic toward the gradient subspace (docs/methods.md).

After the initial SVD an update costs two products with the gradient (O(k l r)) and O(k r^2) small algebra:
the tangent's top singular triplet comes from power iteration on an r x r Gram, never from an SVD of a k x l
matrix.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .base import Context, Tracker, basis_bytes, orthonormality_error, orthonormalize
from .svd import SVD_DEFAULTS, svd_basis, validate_svd

#: re-orthonormalise the basis (QR) when ||S^T S - I||_F exceeds this
ORTH_TOL = 1e-4
#: power iterations for the tangent's top singular vector (the start vector is already one Gram product)
POWER_ITERS = 20
_TINY = 1e-30


def descent_direction(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``H = R A^T`` (k x r): minus half the gradient of ``F(S) = ||S A - G||^2`` at ``A = S^T G``, where
    ``R = G - S A``. Written as ``G A^T - S (A A^T)`` so that the k x l residual is never formed."""
    a = s.mT @ g
    return g @ a.mT - s @ (a @ a.mT)


def top_triplet(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplet ``(u, sigma, v)`` of a k x r matrix by power iteration on ``H^T H`` (r x r).

    The Gram is scaled by its trace (eigenvalues in [0, 1], the largest >= 1/r) so the iterate may go
    unnormalised for a few products; it starts from the Gram's column of largest norm, so the result is
    deterministic. ``sigma = ||H v||`` is exact for the ``v`` found, so a partly converged ``v`` (near-equal
    top singular values) still gives a descent step of the right length. ``H == 0`` gives zeros, hence no
    move, without a host sync.
    """
    gram = h.mT @ h
    gram = gram / gram.trace().clamp_min(_TINY)
    v = gram[:, torch.linalg.vector_norm(gram, dim=0).argmax()]
    for i in range(POWER_ITERS):
        v = gram @ v
        if i % 5 == 4 or i == POWER_ITERS - 1:
            v = v / torch.linalg.vector_norm(v).clamp_min(_TINY)
    hv = h @ v
    sigma = torch.linalg.vector_norm(hv)
    return hv / sigma.clamp_min(_TINY), sigma, v


def geodesic_step(s: torch.Tensor, h: torch.Tensor, eta: float) -> torch.Tensor:
    """Move ``S`` along the geodesic whose tangent is the rank-1 part ``u sigma v^T`` of ``H`` (a descent
    direction of F) by the angle ``theta = eta * sigma`` (at most pi/2):
    ``S + (S v (cos theta - 1) + u sin theta) v^T``."""
    u, sigma, v = top_triplet(h)
    theta = (eta * sigma).clamp(max=math.pi / 2)
    return s + torch.outer((s @ v) * (torch.cos(theta) - 1.0) + u * torch.sin(theta), v)


def subtrack_step(s: torch.Tensor, g: torch.Tensor, eta: float, normalize: bool = True) -> torch.Tensor:
    """One SubTrack update of the orthonormal basis ``s`` (k x r) toward the gradient ``g`` (k x l), float32.

    ``normalize=True`` measures ``g`` in units of its Frobenius norm (H is quadratic in g, so H is divided by
    ``||g||^2`` instead of copying g): the angle is ``eta * sigma(H) / ||g||^2``, independent of the gradient's
    scale. ``normalize=False`` is the paper's and the authors' code's raw step: the angle is
    ``eta * sigma(grad F)`` with ``grad F = -2 H``, i.e. ``2 * eta * sigma(H)``, so a step size from the paper's
    Table 3 gives the paper's step.
    """
    h = descent_direction(s, g)
    if normalize:
        h = h / torch.linalg.vector_norm(g).square().clamp_min(_TINY)
    else:
        eta = 2.0 * eta  # sigma(grad F) = 2 sigma(H)
    new = geodesic_step(s, h, eta)
    if orthonormality_error(new) > ORTH_TOL:
        new = orthonormalize(new)
    return new


class SubTrackTracker(Tracker):
    """``subtrack``: SVD once, then a rank-1 geodesic step every ``update_proj_gap`` steps toward the average
    of the gradients seen since the last update (``accumulate=True``) or toward the current one (``False``).

    ``eta``: with ``normalize=True`` (the default) a scale-free multiplier of the angle, ``theta = eta *
    sigma(H) / ||G||^2`` with ``H = R A^T`` (so ``theta <= eta / 2``: sigma(H) is at most ||G||^2 / 2); with
    ``normalize=False`` the paper's step size, ``theta = eta * sigma(grad F) = 2 eta sigma(H)`` (Table 3's values).

    Default ``eta = 2`` (with ``normalize=True``): the largest multiplier for which an update can never raise
    F for any gradient (tests/test_trackers_subtrack_osd.py shows 2 holds and 3 overshoots); the optimal
    multiplier is about 1 / (share of the gradient's energy along the moved direction), so larger values track
    faster when that share is small (high ranks) at the risk of overshooting on dominant directions.
    """

    name = "subtrack"
    defaults: ClassVar[dict[str, Any]] = {"eta": 2.0, "accumulate": True, "normalize": True, **SVD_DEFAULTS}
    structural = ("accumulate",)
    state_keys: ClassVar[dict[str, str | None]] = {"trk_acc": None, "trk_count": None}  # of the full gradient

    def _get(self, group: dict, key: str):
        return group.get(key, self.defaults[key])

    def state_bytes(self, k, l, rank, group, clock=(1, 0)) -> int:
        """The basis, and the float32 k x l gradient sum with ``accumulate``."""
        return basis_bytes(k, rank, group) + (4 * k * l if self._get(group, "accumulate") else 0)

    def validate(self, group: dict) -> None:
        eta = self._get(group, "eta")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 < eta < math.inf:
            raise ValueError(f"eta must be a positive finite number, got {eta!r}")
        validate_svd(group)
        for key in ("accumulate", "normalize"):
            if type(self._get(group, key)) is not bool:
                raise ValueError(f"{key} must be True or False, got {self._get(group, key)!r}")

    def init(self, gn, rank, state, group, ctx: Context):
        if self._get(group, "accumulate"):
            # float32 whatever the gradient dtype (it sums update_proj_gap gradients), in the weight's own
            # memory layout (zeros_like keeps gn's strides) so that adding each gradient is a contiguous pass
            state["trk_acc"] = torch.zeros_like(gn, dtype=torch.float32)
            state["trk_count"] = 0
        return svd_basis(gn, rank, group, ctx)

    def observe(self, gn, gt, state, group) -> None:
        # An update step's gradient was already used by update(): the window is G_{T_{n-1}+1} .. G_{T_n}.
        if "trk_acc" in state and self._get(group, "accumulate") and not self.due(gn, state, group):
            state["trk_acc"].add_(gn)
            state["trk_count"] += 1

    def update(self, gn, state, group, ctx: Context):
        g = gn.float()
        acc = state.get("trk_acc")
        if acc is not None and self._get(group, "accumulate"):
            g = acc.add_(gn).div_(state["trk_count"] + 1)  # in place: the buffer is reset below
        return subtrack_step(state.basis, g, float(self._get(group, "eta")), self._get(group, "normalize"))

    def on_update(self, state, group) -> None:
        """A new window of gradients starts."""
        if "trk_acc" in state:
            state["trk_acc"].zero_()
            state["trk_count"] = 0
