"""Captured energy, the diagnostic every paper plots: the share of a gradient that lies in the span of the basis."""

from __future__ import annotations

import torch


def captured_energy(basis, gn, gt, inverse_gram: torch.Tensor | None) -> torch.Tensor:
    """``||proj_S Gn||^2 / ||Gn||^2``, the share of the gradient in the span of the basis: ``||Gt||^2`` over it for
    an orthonormal basis, ``tr((S^T S)^-1 Gt Gt^T)`` for another (APOLLO's Gaussian P, whose ``||Gt||^2`` is
    about ``||Gn||^2`` whatever it captures)."""
    norm = torch.linalg.vector_norm(gn, dtype=torch.promote_types(gn.dtype, torch.float32))
    if inverse_gram is None:
        return gt.square().sum() / norm.square()
    return (inverse_gram * (gt @ gt.mT)).sum() / norm.square()


def inverse_gram(basis: torch.Tensor, diag: dict) -> torch.Tensor:
    """``(S^T S)^-1``, kept until the basis changes (a redraw, or OSD's in-place move). ``inv_ex`` does not sync:
    a singular Gram gives inf/NaN energy, not a crash."""
    key = (basis.data_ptr(), basis._version)
    if diag.get("gram_key") != key:
        diag["gram_key"], diag["inverse_gram"] = key, torch.linalg.inv_ex(basis.mT @ basis)[0]
    return diag["inverse_gram"]
