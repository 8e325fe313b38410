"""The weight update of one projected step, written once: back-projection, recovery scaling, FSDP2 rows.

Everything here is in the oriented frame of ``gradspace.projection``: ``gn`` is the k x l oriented gradient,
``basis`` the k x r basis ``S``, ``gt = S^T gn`` the projected gradient and ``ot`` the inner rule's output on it.
"""

from __future__ import annotations

import torch

from .projection import add_back
from .recovery import add_scaled_gradient, recovery_scales, residual_alpha


def apply_update(
    weight: torch.Tensor,
    basis: torch.Tensor,
    gn: torch.Tensor,
    gt: torch.Tensor,
    ot: torch.Tensor,
    state: dict,
    group: dict,
    *,
    right: bool,
    step_size: float,
    orthonormal: bool = True,
    rows: slice | None = None,
) -> None:
    """``weight += step_size * U`` in the weight's own layout, ``step_size`` being ``-lr`` times the rule's factor.

    ``U = scale * S Ot`` (GaLore), or with ``group["recovery"]`` Fira's ``scale S Ot + c (Gn - a S Gt)`` (``c``
    per column with the limiter, ``a`` = scale or 1: ``gradspace.recovery``), computed as
    ``c Gn + S (scale Ot - a c Gt)`` so the k x l residual is never formed. ``orthonormal=False`` (OSD's P)
    takes the residual's norm with the basis's Gram matrix. ``rows``: ``weight`` holds only these rows of the
    full weight (an FSDP2 shard), and ``gn`` is the gathered full gradient.
    """
    scale = float(group["scale"])
    if group["recovery"]:
        a = residual_alpha(group)
        c = recovery_scales(gn, gt, ot, state, group, None if orthonormal else basis.mT @ basis, a)
        if rows is None:
            add_scaled_gradient(weight, gn, c, right, step_size)
        else:
            part = (gn[:, rows], c[rows]) if right else (gn[rows], c)
            add_scaled_gradient(weight, *part, right, step_size)
        ot = ot.to(gt.dtype) * scale - (a * c) * gt
        scale = 1.0
    add_back(weight, basis, ot, right, step_size * scale, rows)
