"""Moment policies: what happens to the inner rule's state when the basis changes (docs/methods.md).

All work in the oriented projected frame, where moments are r x l and the change of basis is
``C = S_new^T S_old`` (r_new x r_old).
"""

from __future__ import annotations

import torch

from .rules.base import InnerRule

POLICIES = ("keep", "reset", "rotate", "project")


def validate_policy(name: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"unknown moment policy {name!r}; choose one of {', '.join(POLICIES)}")


def change_of_basis(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return new.mT @ old


def rotate(m: torch.Tensor, v: torch.Tensor | None, c: torch.Tensor):
    """AdaRankGrad's transport with the sign fix: ``M <- C M``, ``V <- (C*C) V`` (non-negative)."""
    return c @ m, (None if v is None else (c * c) @ v)


def project(m, v, c, bc1: float, bc2: float):
    """Projection-aware transport (LDAdam / SubTrack++): carry the variance through the rotation.

    ``M <- C M``; ``V <- bc2 * |(C*C)(V_hat - M_hat^2) + (C M_hat)^2|`` with bias-corrected hats, re-biased by
    ``bc2 = 1 - beta2^t`` (not ``1 - beta2`` as in the released code).
    """
    m_hat = m / bc1
    v_hat = v / bc2
    cm_hat = c @ m_hat
    v_new = ((c * c) @ (v_hat - m_hat * m_hat) + cm_hat * cm_hat).abs_() * bc2
    return c @ m, v_new


def apply_policy(
    policy: str, rule: InnerRule, state: dict, old: torch.Tensor, new: torch.Tensor, like: torch.Tensor, group: dict
) -> None:
    """Update the rule's state in place for a basis change ``old -> new``; ``like`` has the new projected shape."""
    if policy == "keep" and old.shape == new.shape:
        return
    if policy == "reset" or not rule.moments(state):
        rule.reset(state, like, group)
        return
    if policy == "keep":
        raise ValueError("moment policy 'keep' cannot follow a rank change; use 'rotate', 'project' or 'reset'")
    c = change_of_basis(old, new)
    mom = rule.moments(state)
    m, v = mom["m"], mom.get("v")
    corrections = rule.bias_corrections(state, group) if policy == "project" and v is not None else None
    if corrections is not None and corrections[0] > 0 and corrections[1] > 0:
        m, v = project(m, v, c, *corrections)
    else:
        m, v = rotate(m, v, c)
    out = {"m": m}
    if v is not None:
        out["v"] = v
    rule.set_moments(state, out)
