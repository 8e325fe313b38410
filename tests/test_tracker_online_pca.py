"""Tracker ``online_pca`` (Online Subspace Descent): the closed-form PCA gradient, P's learning rate and decay, no P
step on the initialising step."""

import pytest
import torch
from torch import nn

from conftest import rotating_stream
from gradspace import SubspaceOptimizer
from gradspace.projection import largest_principal_angle
from gradspace.trackers import get_tracker
from gradspace.trackers.base import orthonormalize
from gradspace.trackers.online_pca import pca_grad


# ---------------------------------------------------------------------------------------- online PCA pieces
@pytest.mark.parametrize("k, l, r, lam", [(7, 11, 3, 0.1), (11, 5, 4, 0.0), (9, 9, 2, 2.5)])
def test_online_pca_gradient_equals_autograd(k, l, r, lam):
    gen = torch.Generator().manual_seed(k)
    g = torch.randn(k, l, generator=gen, dtype=torch.float64) * 3.0
    p = torch.randn(k, r, generator=gen, dtype=torch.float64) * 0.5  # far from orthonormal on purpose
    with torch.enable_grad():
        q = p.clone().requires_grad_(True)
        gn = g / g.norm()
        eye = torch.eye(r, dtype=g.dtype)
        loss = (q @ q.mT @ gn - gn).square().sum() + lam * (q.mT @ q - eye).square().sum()
        (ref,) = torch.autograd.grad(loss, q)
    grad, dev = pca_grad(p, g, lam)
    assert torch.allclose(grad, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dev, p.mT @ p - torch.eye(r, dtype=g.dtype))


def test_online_pca_lr_modes_and_diagnostics():
    tracker = get_tracker("online_pca")
    assert tracker.p_lr({"lr": 2e-3, "update_proj_gap": 200}) == pytest.approx(1e-2)  # alpha = 5
    code = {"lr": 5e-4, "initial_lr": 1e-3, "update_proj_gap": 200, "p_lr_mode": "code"}
    assert tracker.p_lr(code) == pytest.approx(0.5 / 200)  # 1/T times the schedule's factor
    assert tracker.p_lr({**code, "p_lr": 0.1}) == pytest.approx(0.05)
    p = nn.Parameter(torch.zeros(30, 60))
    opt = SubspaceOptimizer([{"params": [p], "rank": 4, "param_names": ["w"]}], lr=1e-3, tracker="online_pca")
    for g, _ in rotating_stream(3, 0.01):
        p.grad = g
        opt.step()
    w = opt.diagnostics()["weights"]["w"]
    assert 0.0 < w["trk_diag_orth"] < 0.1 and w["updates"] == 0
    assert opt.state[p]["tracker"]["trk_p_step"] == 2  # no P step on the step that initialised P


@pytest.mark.parametrize("preset", ["osd", "osd-code"])
def test_no_p_step_on_the_initialising_step(preset):
    """At the SVD start the online-PCA loss is stationary; a P step there would move every entry of P by
    Adam's full alpha * lr (normalised rounding noise) and lose the SVD (docs/methods.md)."""
    from gradspace import create_optimizer
    from gradspace.trackers.svd import top_singular_basis

    p = nn.Parameter(torch.zeros(30, 60))
    opt = create_optimizer(preset, [{"params": [p], "rank": 4}], lr=1e-3)
    (g, _), (g2, _) = rotating_stream(2, 0.01)
    p.grad = g
    opt.step()
    assert torch.equal(opt.state[p]["basis"], top_singular_basis(g, 4, False))
    assert opt.state[p]["tracker"]["trk_p_step"] == 0
    p.grad = g2
    opt.step()  # the second step moves P, a little
    moved = float(largest_principal_angle(orthonormalize(opt.state[p]["basis"]), top_singular_basis(g, 4, False)))
    assert 0.0 < moved < 0.1 and opt.state[p]["tracker"]["trk_p_step"] == 1


def test_p_weight_decay_follows_w_unless_set():
    tracker = get_tracker("online_pca")
    assert tracker.p_weight_decay({"weight_decay": 0.1}) == 0.1
    assert tracker.p_weight_decay({"weight_decay": 0.1, "p_weight_decay": 0.0}) == 0.0
    from gradspace import create_optimizer

    opt = create_optimizer("osd-code", [{"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2}], weight_decay=0.1)
    assert tracker.p_weight_decay(opt.param_groups[0]) == 0.01  # the authors' code's own setting
