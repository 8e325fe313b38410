"""Recovery scaling (Fira-style, docs/methods.md "Fira"): add back the part of the gradient the projection drops.

Per column j of the oriented projected frame, ``phi_j = ||Ot[:, j]|| / (||Gt[:, j]|| + 1e-8)`` says how much the
inner rule rescaled that column. With ``alpha`` the GaLore scale, the update is the reference code's
(``fira==1.0.2``'s ``FiraAdamW``, copied by the released SubTrack++ code, whose ``project_back`` multiplies by
alpha):

    alpha * S Ot  +  phi * (Gn - alpha * S Gt)          (recovery_residual="scaled", the reference)

so alpha scales the subspace part and the subtracted projection, not the residual term. The labelled variant
``recovery_residual="true"`` subtracts the true projection instead, ``alpha S Ot + phi (Gn - S Gt)``. A limiter
keeps the residual term's norm from growing more than ``recovery_limit`` (1.01) times per step, exactly as Fira's
(``limiter = max(norm / (last + 1e-8), 1.01) / 1.01``; the stored norm is the post-limit one), except that a last
norm of exactly 0 (a zero gradient on the first step) sets no limit, where Fira's would throttle recovery to
1e-8 for a thousand steps. Its only state is one scalar tensor per weight (``rec_norm``): no device sync.

The residual is never formed. With ``c = phi / limiter`` (one factor per column) and ``a`` the residual's alpha,

    alpha S Ot + c (Gn - a S Gt)  =  c Gn  +  S (alpha Ot - a c Gt)

one scaled add of the gradient plus the back-projection GaLore does anyway, with an r x l correction of its input.
The residual's norm comes from column norms, ``||R_j||^2 = ||Gn_j||^2 - 2 a ||Gt_j||^2 + a^2 Gt_j^T (S^T S) Gt_j``,
where ``S^T S = I`` for every tracker except OSD (whose basis is only nearly orthonormal; its Gram matrix is passed).
"""

from __future__ import annotations

import math

import torch

RESIDUALS = ("scaled", "true")
#: the limiter's last norm, one float32 scalar per weight
STATE_BYTES = 4
#: the state entry the limiter keeps (a replicated scalar)
STATE_KEYS = ("rec_norm",)
RECOVERY_DEFAULTS = {"recovery_limit": 1.01, "recovery_residual": "scaled"}


def validate(group: dict) -> None:
    limit = group.get("recovery_limit", RECOVERY_DEFAULTS["recovery_limit"])
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 1.0:
        raise ValueError(
            f"recovery_limit must be a number >= 1 (growth factor per step; inf: no limiter), got {limit!r}"
        )
    residual = group.get("recovery_residual", RECOVERY_DEFAULTS["recovery_residual"])
    if residual not in RESIDUALS:
        raise ValueError(
            f"recovery_residual must be 'scaled' (Fira's reference form) or 'true' (variant), got {residual!r}"
        )


def residual_alpha(group: dict) -> float:
    """The factor of the projection subtracted from the gradient: the GaLore scale (reference) or 1."""
    return float(group["scale"]) if group.get("recovery_residual", "scaled") == "scaled" else 1.0


def recovery_scales(
    gn: torch.Tensor,
    gt: torch.Tensor,
    ot: torch.Tensor,
    state: dict,
    group: dict,
    gram: torch.Tensor | None = None,
    a: float = 1.0,
) -> torch.Tensor:
    """The per-column factors ``c`` (length l) of the residual ``Gn - a S Gt``, limiter included; updates
    ``state["rec_norm"]``."""
    gt_sq = gt.square().sum(0)
    phi = torch.linalg.vector_norm(ot.to(gt.dtype), dim=0) / (gt_sq.sqrt() + 1e-8)
    gn_sq = torch.linalg.vector_norm(gn, dim=0, dtype=torch.promote_types(gn.dtype, gt.dtype)).square().to(gt.dtype)
    in_span = gt_sq if gram is None else (gt * (gram @ gt)).sum(0)
    residual_sq = (gn_sq - (2.0 * a) * gt_sq + (a * a) * in_span).clamp_min(0)
    norm = (phi.square() * residual_sq).sum().sqrt()
    return phi / limit_growth(norm, state, float(group["recovery_limit"]))


def limit_growth(norm: torch.Tensor, state: dict, zeta: float) -> torch.Tensor:
    """Fira's norm-growth limiter (also APOLLO's): the divisor (a 0-d tensor, 1 on the first step) that keeps an
    update's norm from growing more than ``zeta`` times per step; stores the post-limit norm in
    ``state["rec_norm"]``. A last norm of exactly 0 sets no limit (see the module docstring)."""
    last = state.get("rec_norm")
    limiter = torch.ones_like(norm)
    if last is not None and math.isfinite(zeta):
        limiter = torch.where(last > 0, (norm / (last + 1e-8)).clamp_min(zeta) / zeta, limiter)
    state["rec_norm"] = norm / limiter
    return limiter


def add_scaled_gradient(p: torch.Tensor, gn: torch.Tensor, scales: torch.Tensor, right: bool, alpha: float) -> None:
    """``p += alpha * (Gn * scales)`` (column j of the oriented gradient times ``scales[j]``), in p's layout."""
    if right:  # Gn = G^T: its columns are G's rows
        p.addcmul_(gn.mT, scales.unsqueeze(1).to(p.dtype), value=alpha)
    else:
        p.addcmul_(gn, scales.unsqueeze(0).to(p.dtype), value=alpha)
