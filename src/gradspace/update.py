"""The output seam: how the inner rule's output becomes the weight's update (docs/methods.md, "The frame").

Two output rules, chosen by the group key ``output``:

- ``"project"`` (GaLore and every seed method): back-projection ``U = scale * S Ot``, with Fira's recovery
  scaling of the dropped residual when ``recovery=True`` (``gradspace.recovery``);
- ``"scale"`` (APOLLO): the *raw* gradient scaled by how much the inner rule rescaled its projection,
  ``U = sqrt(scale) * Gn * s`` with ``s_j = ||Ot[:, j]|| / (||Gt[:, j]|| + 1e-8)`` per column of the oriented frame
  (``scale_type="channel"``: one factor per channel of the larger side, as apollo-torch's ``norm_dim``) or one
  ``s = ||Ot|| / (||Gt|| + 1e-8)`` for the whole weight (``"tensor"``, APOLLO-Mini), then the norm-growth limiter.

Everything here is in the oriented frame of ``gradspace.projection``: ``gn`` is the k x l oriented gradient,
``basis`` the k x r basis ``S``, ``gt = S^T gn`` the projected gradient and ``ot`` the inner rule's output on it.
``rows``: ``weight`` holds only these rows of the full weight (an FSDP2 shard), and ``gn`` is the gathered full
gradient whenever the output reads it (``needs_full_gradient``).
"""

from __future__ import annotations

import math

import torch

from .projection import add_back
from .recovery import STATE_BYTES, add_scaled_gradient, limit_growth, recovery_scales, residual_alpha

SCALE_TYPES = ("channel", "tensor")
#: group keys of the output seam, with their defaults (projected groups only)
OUTPUT_DEFAULTS = {"output": "project", "scale_type": "channel"}


def validate(group: dict) -> None:
    output = group.get("output", "project")
    if output not in OUTPUT_RULES:
        raise ValueError(f"unknown output {output!r}; choose 'project' (back-projection) or 'scale' (APOLLO)")
    if group.get("scale_type", "channel") not in SCALE_TYPES:
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {group['scale_type']!r}")
    if output == "scale" and group.get("recovery"):
        raise ValueError(
            "recovery=True adds back the residual a back-projection drops; output='scale' updates with the whole "
            "gradient, so there is no residual: use recovery=False"
        )


def needs_full_gradient(group: dict) -> bool:
    """Whether the update reads the full gradient, not only its projection (no projected accumulation then)."""
    return bool(group["recovery"]) or group.get("output", "project") == "scale"


def state_bytes(group: dict) -> int:
    """Bytes of the output's own state: the limiter's last norm (recovery and APOLLO), one float32 scalar."""
    return STATE_BYTES if needs_full_gradient(group) else 0


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
    """``weight += step_size * U`` in the weight's own layout, ``step_size`` being ``-lr`` times the rule's
    factor, with ``U`` from the group's output rule. ``orthonormal=False``: the basis's Gram matrix is not I."""
    rule = OUTPUT_RULES[group.get("output", "project")]
    rule(weight, basis, gn, gt, ot, state, group, right=right, step_size=step_size, orthonormal=orthonormal, rows=rows)


def project_back(weight, basis, gn, gt, ot, state, group, *, right, step_size, orthonormal, rows) -> None:
    """``U = scale * S Ot`` (GaLore), or with ``group["recovery"]`` Fira's ``scale S Ot + c (Gn - a S Gt)`` (``c``
    per column with the limiter, ``a`` = scale or 1: ``gradspace.recovery``), computed as
    ``c Gn + S (scale Ot - a c Gt)`` so the k x l residual is never formed. A non-orthonormal basis (OSD's P)
    takes the residual's norm with its Gram matrix."""
    scale = float(group["scale"])
    if group["recovery"]:
        a = residual_alpha(group)
        c = recovery_scales(gn, gt, ot, state, group, None if orthonormal else basis.mT @ basis, a)
        _add_columns(weight, gn, c, right, step_size, rows)
        ot = ot.to(gt.dtype) * scale - (a * c) * gt
        scale = 1.0
    add_back(weight, basis, ot, right, step_size * scale, rows)


def scale_gradient(weight, basis, gn, gt, ot, state, group, *, right, step_size, orthonormal, rows) -> None:
    """APOLLO: ``U = sqrt(scale) * Gn * s``, ``s`` per column (channel) or one for the tensor, limited so that
    ``||Gn * s||`` grows at most ``recovery_limit`` (1.01) times per step (apollo-torch's limiter, which acts before
    the ``sqrt(scale)`` factor; the ratio is the same either way). The basis is not used here: it only shaped
    ``gt`` and ``ot``."""
    ot = ot.to(gt.dtype)
    if group.get("scale_type", "channel") == "channel":
        s = torch.linalg.vector_norm(ot, dim=0) / (torch.linalg.vector_norm(gt, dim=0) + 1e-8)
    else:
        s = (torch.linalg.vector_norm(ot) / (torch.linalg.vector_norm(gt) + 1e-8)).expand(gn.shape[1])
    gn_sq = torch.linalg.vector_norm(gn, dim=0, dtype=torch.promote_types(gn.dtype, gt.dtype)).square().to(gt.dtype)
    norm = (s.square() * gn_sq).sum().sqrt()
    s = s / limit_growth(norm, state, float(group["recovery_limit"]))
    _add_columns(weight, gn, s, right, step_size * math.sqrt(float(group["scale"])), rows)


def _add_columns(weight, gn, factors, right: bool, alpha: float, rows: slice | None) -> None:
    """``weight += alpha * Gn * factors`` (per column of the oriented gradient), on this rank's rows if sharded."""
    if rows is not None:
        gn, factors = (gn[:, rows], factors[rows]) if right else (gn[rows], factors)
    add_scaled_gradient(weight, gn, factors, right, alpha)


#: output name -> the function that applies it
OUTPUT_RULES = {"project": project_back, "scale": scale_gradient}
