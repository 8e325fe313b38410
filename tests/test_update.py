"""The math of one projected step (``gradspace.update.apply_update``) against the update written out densely."""

import pytest
import torch

from gradspace.trackers.base import orthonormalize
from gradspace.update import apply_update


def dense_update(s, g, ot, scale, recovery, a, phi_limit=None):
    """``scale S Ot`` (+ ``phi (G - a S Gt)``), formed explicitly in the oriented frame."""
    u = scale * s @ ot
    if recovery:
        gt = s.T @ g
        phi = ot.norm(dim=0) / (gt.norm(dim=0) + 1e-8)
        u = u + phi * (g - a * s @ gt)
    return u


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("recovery, residual", [(False, "scaled"), (True, "scaled"), (True, "true")])
def test_apply_update_equals_the_dense_formula(right, recovery, residual):
    gen = torch.Generator().manual_seed(0)
    k, l, r, scale, step = 12, 20, 3, 0.25, -0.1
    s = orthonormalize(torch.randn(k, r, generator=gen))
    g = torch.randn(k, l, generator=gen)
    ot = torch.randn(r, l, generator=gen)
    w0 = torch.randn(l, k) if right else torch.randn(k, l)
    group = {"scale": scale, "recovery": recovery, "recovery_limit": 1.01, "recovery_residual": residual}
    w = w0.clone()
    apply_update(w, s, g, s.T @ g, ot, {}, group, right=right, step_size=step)
    u = dense_update(s, g, ot, scale, recovery, scale if residual == "scaled" else 1.0)
    expected = w0 + step * (u.T if right else u)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("right", [False, True])
def test_an_fsdp2_shard_gets_its_rows_of_the_full_update(right):
    gen = torch.Generator().manual_seed(1)
    k, l, r = 10, 16, 2
    s = orthonormalize(torch.randn(k, r, generator=gen))
    g, ot = torch.randn(k, l, generator=gen), torch.randn(r, l, generator=gen)
    group = {"scale": 0.5, "recovery": True, "recovery_limit": 1.01, "recovery_residual": "scaled"}
    full = torch.zeros((l, k) if right else (k, l))
    apply_update(full, s, g, s.T @ g, ot, {}, group, right=right, step_size=1.0)
    rows = slice(3, 7)
    shard = torch.zeros_like(full[rows])
    apply_update(shard, s, g, s.T @ g, ot, {}, group, right=right, step_size=1.0, rows=rows)
    torch.testing.assert_close(shard, full[rows])
