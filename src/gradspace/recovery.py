"""Recovery scaling (Fira-style, ALGORITHMS.md 7.3): add back the part of the gradient the projection drops.

Per column j of the oriented projected frame, ``phi_j = ||Ot[:, j]|| / ||Gt[:, j]||`` says how much the inner
rule rescaled that column; the dropped residual ``R = Gn - S Gt`` is scaled by the same ``phi_j``. A limiter keeps
the residual term's norm from growing more than ``recovery_limit`` (1.01) times per step; its only state is one
scalar tensor per weight (``rec_norm``), kept as a tensor so no device sync is needed.

The residual is never formed. With ``c = phi * shrink`` (one factor per column) the whole update is

    S Ot + c * (Gn - S Gt)  =  c * Gn  +  S (Ot - c * Gt)

one scaled add of the gradient plus the back-projection GaLore does anyway, with an r x l correction of its input.
The residual's norm comes from column norms, ``||R_j||^2 = ||Gn_j||^2 - 2 ||Gt_j||^2 + Gt_j^T (S^T S) Gt_j``, where
``S^T S = I`` for every tracker except OSD (whose basis is only nearly orthonormal; its Gram matrix is passed in).
"""

from __future__ import annotations

import torch

RECOVERY_DEFAULTS = {"recovery_limit": 1.01}


def recovery_scales(
    gn: torch.Tensor, gt: torch.Tensor, ot: torch.Tensor, state: dict, group: dict, gram: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-column factors ``c`` (length l) of the residual, limiter included; updates ``state["rec_norm"]``."""
    gt_sq = gt.square().sum(0)
    phi = torch.linalg.vector_norm(ot.to(gt.dtype), dim=0) / (gt_sq.sqrt() + 1e-8)
    gn_sq = torch.linalg.vector_norm(gn, dim=0, dtype=gt.dtype).square()
    in_span = gt_sq if gram is None else (gt * (gram @ gt)).sum(0)
    residual_sq = (gn_sq - 2 * gt_sq + in_span).clamp_min(0)
    norm = (phi.square() * residual_sq).sum().sqrt()
    last = state.get("rec_norm")
    if last is not None:
        limit = float(group["recovery_limit"]) * last
        shrink = torch.where((last > 0) & (norm > limit), limit / norm.clamp_min(1e-30), torch.ones_like(norm))
        phi = phi * shrink
        norm = norm * shrink
    state["rec_norm"] = norm
    return phi


def add_scaled_gradient(p: torch.Tensor, gn: torch.Tensor, scales: torch.Tensor, right: bool, alpha: float) -> None:
    """``p += alpha * (Gn * scales)`` (column j of the oriented gradient times ``scales[j]``), in p's layout."""
    if right:  # Gn = G^T: its columns are G's rows
        p.addcmul_(gn.mT, scales.unsqueeze(1).to(p.dtype), value=alpha)
    else:
        p.addcmul_(gn, scales.unsqueeze(0).to(p.dtype), value=alpha)
