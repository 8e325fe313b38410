"""GaLore's tracker: the top-r singular vectors of the current gradient, every ``update_proj_gap`` steps; and the
SVD every tracker's first basis comes from, exact or randomized (``svd="exact"|"randomized"``).

The randomized SVD is the range finder of Halko, Martinsson & Tropp (2011, Algorithm 4.4): ``Y = G Omega`` with a
Gaussian ``Omega`` (l x (r + p), ``p = svd_oversample``), ``Q = qr(Y).Q``, then ``svd_power_iters`` subspace
iterations ``Q = qr(G G^T Q).Q``, and the top-r left singular vectors of the small ``Q^T G`` mapped back by ``Q``.
Its cost is ``(2 + 2 q)`` products of G with a thin matrix instead of a full SVD; the defaults (p, q) were chosen
by ``python -m gradspace.bench svd`` on real LLaMA-1B gradients (docs/benchmarks.md). ``Omega`` comes from a
generator seeded by (seed, parameter index, basis number), never the global RNG (``torch.svd_lowrank`` draws from
the global one): data-parallel ranks and resumed runs compute the same basis.

Singular vectors are defined up to sign, and LAPACK's choice is not a continuous function of the matrix: a 1e-7
change of a gradient can return a column negated, which the kept first moment then meets with the other sign.
``svd_sign="canonical"`` makes the largest-magnitude entry of every column positive (scikit-learn's
``svd_flip``), so the basis depends on the gradient alone; the default ``"lapack"`` keeps the solver's signs, as
galore-torch does (so parity with it holds).
"""

from __future__ import annotations

import logging

import torch

from .base import Context, Tracker, seeded_generator

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


SVD_METHODS = ("exact", "randomized")
SVD_SIGNS = ("lapack", "canonical")
#: the options of every tracker whose bases come from an SVD
#: ``svd_power_iters=None``: 1 while the sketch (rank + oversample columns) spans less than a quarter of the
#: smaller side, else 0 (measured on real LLaMA-1B gradients, docs/benchmarks.md: at rank 128 one iteration cuts
#: the worst energy shortfall from 4.1% to 0.2%; at rank 512 none is needed, 0.001%, and it costs 60% more time)
SVD_DEFAULTS = {"svd": "exact", "svd_oversample": 16, "svd_power_iters": None, "svd_sign": "lapack"}


def power_iterations(group: dict, k: int, rank: int) -> int:
    value = group.get("svd_power_iters")
    if value is not None:
        return int(value)
    return 1 if 4 * (rank + int(group.get("svd_oversample", SVD_DEFAULTS["svd_oversample"]))) < k else 0


def validate_svd(group: dict) -> None:
    method = group.get("svd", "exact")
    if method not in SVD_METHODS:
        raise ValueError(f"svd must be 'exact' or 'randomized', got {method!r}")
    validate_sign(group)
    for key in ("svd_oversample", "svd_power_iters"):
        value = group.get(key, SVD_DEFAULTS[key])
        if value is None and key == "svd_power_iters":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{key} must be an integer >= 0{' or None (auto)' if 'power' in key else ''}, got {value!r}"
            )


def validate_sign(group: dict) -> None:
    sign = group.get("svd_sign", "lapack")
    if sign not in SVD_SIGNS:
        raise ValueError(f"svd_sign must be 'lapack' (the solver's signs) or 'canonical', got {sign!r}")


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """Each column times the sign of its largest-magnitude entry (the first of equal ones), as scikit-learn's
    ``svd_flip``: a negated column comes back as it was, so the solver's arbitrary sign no longer matters."""
    if basis.is_meta:
        return basis
    top = basis.gather(0, basis.abs().argmax(dim=0, keepdim=True))
    return (basis * torch.where(top < 0, -1.0, 1.0).to(basis.dtype)).contiguous()


def signed(basis: torch.Tensor, group: dict) -> torch.Tensor:
    """``basis`` with the group's ``svd_sign`` convention."""
    return canonical_signs(basis) if group.get("svd_sign", "lapack") == "canonical" else basis


def svd_basis(gn: torch.Tensor, rank: int, group: dict, ctx: Context, draw: int = 0) -> torch.Tensor:
    """The top-``rank`` left singular vectors of ``gn``, by the group's ``svd`` method and with its ``svd_sign``
    convention; ``draw`` numbers the bases of one weight (0 = the first), which seeds the randomized sketch."""
    if group.get("svd", "exact") == "randomized":
        basis = randomized_basis(
            gn,
            rank,
            ctx,
            draw,
            int(group.get("svd_oversample", SVD_DEFAULTS["svd_oversample"])),
            power_iterations(group, gn.shape[0], rank),
        )
    else:
        basis = top_singular_basis(gn, rank, ctx.right)
    return signed(basis, group)


def randomized_basis(
    gn: torch.Tensor, rank: int, ctx: Context, draw: int, oversample: int, power_iters: int
) -> torch.Tensor:
    """The randomized SVD's top-``rank`` left singular vectors (k x rank, float32): see the module docstring."""
    g = gn.detach().float()
    k, l = g.shape
    cols = min(rank + oversample, k, l)
    if g.is_meta:  # shapes only (bench memory)
        return g.new_empty((k, rank))
    gen = seeded_generator(ctx, draw, g.device, purpose="sketch")
    q = torch.linalg.qr(g @ torch.randn(l, cols, generator=gen, device=g.device)).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(g @ (g.mT @ q)).Q
    ub, _ = left_singular(q.mT @ g)
    return (q @ ub[:, :rank]).contiguous()


def left_singular(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Ub`` and ``Sb^2`` of a small r x l matrix ``B``, descending, from the float64 eigendecomposition of
    ``B B^T``: the same decomposition as ``svd(B)``, about 10x cheaper (r x r instead of r x l, no ``Vb``)."""
    b = b.double()
    evals, vecs = torch.linalg.eigh(b @ b.mT)
    return vecs.flip(-1).float(), evals.flip(-1).clamp_min(0.0)


def gram_eigen_basis(g: torch.Tensor, rank: int) -> torch.Tensor:
    """Top eigenvectors of ``g g^T`` in float64: the left singular vectors without an SVD."""
    gram = g.double() @ g.double().mT
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -rank:].flip(-1).to(g.dtype).contiguous()


class SVDTracker(Tracker):
    name = "svd"
    needs_every_gradient = False
    defaults = SVD_DEFAULTS

    def validate(self, group: dict) -> None:
        validate_svd(group)

    def init(self, gn, rank, state, group, ctx: Context):
        return svd_basis(gn, rank, group, ctx)

    def update(self, gn, state, group, ctx: Context):
        return svd_basis(gn, state.basis.shape[1], group, ctx, state.updates + 1)
