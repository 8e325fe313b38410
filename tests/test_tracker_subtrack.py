"""Tracker ``subtrack`` (SubTrack-Grad): the geodesic step, its step size, orthonormality, the window."""

import math

import pytest
import torch
from torch import nn

from conftest import angle
from gradspace import SubspaceOptimizer
from gradspace.projection import largest_principal_angle
from gradspace.trackers.base import orthonormality_error, orthonormalize
from gradspace.trackers.subtrack import descent_direction, geodesic_step, subtrack_step, top_triplet


# ------------------------------------------------------------------------------------------ subtrack pieces
def objective(s, g):
    """F(S) = min_A ||S A - G||^2 for orthonormal S."""
    return float((s @ (s.mT @ g) - g).double().square().sum())


def test_geodesic_step_moves_downhill_and_default_eta_never_overshoots():
    """H = R A^T is minus half the gradient of F: the step lowers F. eta = 2 (the default, with normalize) is
    the largest multiplier that cannot raise F for any gradient (with ||G|| = 1, a = ||A^T v||^2,
    b = ||R^T u||^2, c = sigma: F does not rise iff tan(eta c) (a - b) <= 2c, true for eta = 2 since
    a + b <= 1 and c^2 <= ab); eta = 3 overshoots when the moved direction carries most of the energy."""
    gen = torch.Generator().manual_seed(0)
    etas = (2.0, 3.0)
    worst = dict.fromkeys(etas, -math.inf)
    for trial in range(300):
        s = orthonormalize(torch.randn(12, 3, generator=gen, dtype=torch.float64))
        if trial % 2:  # most of the energy on one basis column, a little outside the subspace
            size = 10 ** (-3 * torch.rand(1, generator=gen))
            x = s[:, 0] + size * torch.randn(12, generator=gen, dtype=s.dtype)
            g = torch.outer(x, torch.randn(10, generator=gen, dtype=s.dtype))
        else:
            g = torch.randn(12, 10, generator=gen, dtype=s.dtype)
        g = g / g.norm()
        h = descent_direction(s, g)
        for eta in etas:
            worst[eta] = max(worst[eta], objective(geodesic_step(s, h, eta), g) - objective(s, g))
        if trial == 0:
            assert objective(geodesic_step(s, h, 2.0), g) < objective(s, g) - 1e-3
            assert objective(geodesic_step(s, -h, 2.0), g) > objective(s, g) + 1e-3  # the flipped sign climbs
    assert worst[2.0] <= 1e-12
    assert worst[3.0] > 1e-2


def test_top_triplet_matches_svd_and_zero_tangent_does_not_move():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(40, 8, generator=gen) @ torch.diag(torch.tensor([5.0, 3, 2, 1, 1, 0.5, 0.2, 0.1]))
    u, sigma, v = top_triplet(h)
    ref_u, ref_s, ref_vh = torch.linalg.svd(h, full_matrices=False)
    assert float(sigma) == pytest.approx(float(ref_s[0]), rel=1e-5)
    assert float((u @ ref_u[:, 0]).abs()) == pytest.approx(1.0, abs=1e-5)
    assert float((v @ ref_vh[0]).abs()) == pytest.approx(1.0, abs=1e-5)
    s = orthonormalize(torch.randn(40, 8, generator=gen))
    assert torch.equal(geodesic_step(s, torch.zeros(40, 8), 2.0), s)
    inside = s @ torch.randn(8, 5, generator=gen)  # G in span(S): (almost) no move
    assert torch.allclose(subtrack_step(s, inside, 2.0), s, atol=1e-6)


def test_raw_step_size_is_the_papers():
    """normalize=False: the paper's eq. 6 with its own step size, written out from the paper and the authors'
    code: tangent -grad F = 2 R A^T (F(S) = ||S A - G||^2), top singular triplet (u, s, v) of it by a full SVD,
    S + (S v (cos(eta s) - 1) + u sin(eta s)) v^T. A factor-2 slip would halve every published step size."""
    gen = torch.Generator().manual_seed(7)
    s = orthonormalize(torch.randn(20, 4, generator=gen, dtype=torch.float64))
    g = torch.randn(20, 15, generator=gen, dtype=torch.float64) * 0.1
    for eta in (0.05, 0.5, 3.0):  # Table 3's range of step sizes, kept below the pi/2 clamp
        a = s.mT @ g
        minus_grad = 2.0 * (g - s @ a) @ a.mT
        u, sig, vh = torch.linalg.svd(minus_grad, full_matrices=False)
        u, sig, v = u[:, 0], sig[0], vh[0]
        assert float(eta * sig) < math.pi / 2
        expected = s + torch.outer((s @ v) * (torch.cos(eta * sig) - 1.0) + u * torch.sin(eta * sig), v)
        got = subtrack_step(s, g, eta, normalize=False)
        assert torch.allclose(got, expected, atol=1e-9), eta
        assert float(largest_principal_angle(got, s)) == pytest.approx(float(eta * sig), rel=1e-3)  # arccos in float32


def test_orthonormal_after_10000_float32_updates():
    gen = torch.Generator().manual_seed(2)
    s = orthonormalize(torch.randn(16, 4, generator=gen))
    start, moved = s, 0.0
    for _ in range(10_000):
        new = subtrack_step(s, torch.randn(16, 6, generator=gen), 2.0)
        moved += float(largest_principal_angle(s, new)) if _ % 1000 == 0 else 0.0
        s = new
    assert s.dtype == torch.float32
    assert orthonormality_error(s) <= 1e-5
    assert moved > 0.1 and angle(s, start) > 0.5  # it did move, a lot


def test_reorthonormalises_a_drifted_basis():
    gen = torch.Generator().manual_seed(3)
    s = orthonormalize(torch.randn(16, 4, generator=gen)) * 1.001  # ||S^T S - I|| ~ 4e-3
    assert orthonormality_error(subtrack_step(s, torch.randn(16, 6, generator=gen), 2.0)) < 1e-5


def test_accumulates_the_paper_window():
    """The update at step T uses the mean of G_1 .. G_T (the update step's own gradient included once)."""
    p = nn.Parameter(torch.zeros(6, 10))
    opt = SubspaceOptimizer([{"params": [p], "rank": 2, "update_proj_gap": 4}], lr=0.0, tracker="subtrack")
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(6, 10, generator=gen) for _ in range(5)]
    for g in grads[:4]:
        p.grad = g
        opt.step()
    st = opt.state[p]
    own = st["tracker"]
    assert own["trk_count"] == 3 and torch.allclose(own["trk_acc"], sum(grads[1:4]))
    before = st["basis"].clone()
    p.grad = grads[4]
    opt.step()  # step 4: an update
    expected = subtrack_step(before, sum(grads[1:5]) / 4, 2.0)
    assert torch.allclose(st["basis"], expected, atol=1e-6)
    assert own["trk_count"] == 0 and not own["trk_acc"].any()
    q = nn.Parameter(torch.zeros(6, 10))
    opt = SubspaceOptimizer([{"params": [q], "rank": 2}], tracker="subtrack", accumulate=False)
    q.grad = grads[0]
    opt.step()
    assert opt.state[q]["tracker"] == {}  # accumulate=False keeps no buffer
