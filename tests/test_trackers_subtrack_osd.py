"""Trackers ``subtrack`` (SubTrack-Grad) and ``online_pca`` (Online Subspace Descent), ALGORITHMS.md 3-4."""

import io
import math

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups, train
from gradspace import SubspaceOptimizer
from gradspace.projection import largest_principal_angle
from gradspace.trackers import get_tracker
from gradspace.trackers.base import orthonormality_error, orthonormalize
from gradspace.trackers.online_pca import pca_grad
from gradspace.trackers.subtrack import descent_direction, geodesic_step, subtrack_step, top_triplet


def rotating_stream(steps, omega, k=30, l=60, r=4, noise=0.3, seed=0):
    """Gradients ``G_t = U_t diag(s) V^T + noise`` (k x l) whose rank-r left subspace turns by a fixed
    rotation ``exp(K)`` per step: column i of ``U_0`` turns toward its own orthogonal direction at
    ``omega * rate_i`` rad/step, so the largest principal angle between ``U_t`` and ``U_0`` is ``omega * t``.
    Yields ``(G_t, U_t)``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(k, 2 * r, generator=gen)).Q
    u0, w = q[:, :r], q[:, r:]
    v = torch.linalg.qr(torch.randn(l, r, generator=gen)).Q
    spectrum = torch.tensor([4.0, 3.0, 2.0, 1.5])[:r]
    rates = torch.linspace(1.0, 0.25, r)
    for t in range(steps):
        ut = u0 * torch.cos(omega * t * rates) + w * torch.sin(omega * t * rates)
        yield (ut * spectrum) @ v.mT + noise * torch.randn(k, l, generator=gen) / math.sqrt(l), ut


def angle(basis, truth):
    """Largest principal angle between spans (online PCA's P is only near-orthonormal)."""
    return float(largest_principal_angle(orthonormalize(basis), truth))


# ------------------------------------------------------------------------------------------------- tracking
TRACKING = {
    # 20 subspace updates (steps 5, 10, ..., 100) vs 200 online-PCA steps, both for a total rotation of 1 rad
    "subtrack": {"steps": 101, "omega": 0.01, "gap": 5},
    "online_pca": {"steps": 201, "omega": 0.005, "gap": 200},
}


def track(tracker, shape, **options):
    """Feed the stream to one (m, n) weight through SubspaceOptimizer; the basis side is min(m, n) = 30 either
    way: the rows for (30, 60) (G itself), the columns for (60, 30) (the weight's gradient is G^T)."""
    cfg = TRACKING[tracker]
    p = nn.Parameter(torch.zeros(shape))
    group = {"params": [p], "rank": 4, "update_proj_gap": cfg["gap"]}
    opt = SubspaceOptimizer([group], lr=1e-3, tracker=tracker, **options)
    stream = list(rotating_stream(cfg["steps"], cfg["omega"]))
    for g, _ in stream:
        p.grad = g if shape[0] < shape[1] else g.mT.contiguous()
        opt.step()
    (_, start), (_, truth) = stream[0], stream[-1]
    return angle(opt.state[p]["basis"], truth), angle(start, truth)


@pytest.mark.parametrize("shape", [(30, 60), (60, 30)])
@pytest.mark.parametrize(
    "tracker, options",
    [
        ("subtrack", {}),
        ("subtrack", {"accumulate": False}),
        ("online_pca", {}),
        ("online_pca", {"p_optimizer": "sgd", "alpha": 100.0}),  # SGD needs a far larger step than Adam
    ],
)
def test_tracks_a_rotating_subspace_in_both_orientations(tracker, options, shape):
    tracked, frozen = track(tracker, shape, **options)
    assert frozen == pytest.approx(1.0, abs=1e-3)  # the truth really moved by 1 rad
    assert tracked <= 0.5 * frozen, (tracked, frozen)


def test_orientations_give_the_same_basis():
    """The optimizer transposes for m > n: the tracker must see exactly the same oriented gradients."""
    bases = []
    for shape in [(30, 60), (60, 30)]:
        p = nn.Parameter(torch.zeros(shape))
        opt = SubspaceOptimizer([{"params": [p], "rank": 4, "update_proj_gap": 5}], tracker="subtrack")
        for g, _ in rotating_stream(31, 0.01):
            p.grad = g if shape[0] < shape[1] else g.mT.contiguous()
            opt.step()
        bases.append(opt.state[p]["basis"])
    assert opt.state[p]["updates"] == 6
    assert angle(bases[0], bases[1]) < 1e-3


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
    assert st["trk_count"] == 3 and torch.allclose(st["trk_acc"], sum(grads[1:4]))
    before = st["basis"].clone()
    p.grad = grads[4]
    opt.step()  # step 4: an update
    expected = subtrack_step(before, sum(grads[1:5]) / 4, 2.0)
    assert torch.allclose(st["basis"], expected, atol=1e-6)
    assert st["trk_count"] == 0 and not st["trk_acc"].any()
    q = nn.Parameter(torch.zeros(6, 10))
    opt = SubspaceOptimizer([{"params": [q], "rank": 2}], tracker="subtrack", accumulate=False)
    q.grad = grads[0]
    opt.step()
    assert not any(key.startswith("trk_") for key in opt.state[q])  # accumulate=False keeps no buffer


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
    assert opt.state[p]["trk_p_step"] == 2  # no P step on the step that initialised P


@pytest.mark.parametrize("preset", ["osd", "osd-code"])
def test_no_p_step_on_the_initialising_step(preset):
    """At the SVD start the online-PCA loss is stationary; a P step there would move every entry of P by
    Adam's full alpha * lr (normalised rounding noise) and lose the SVD (ALGORITHMS.md 4)."""
    from gradspace import create_optimizer
    from gradspace.trackers.svd import top_singular_basis

    p = nn.Parameter(torch.zeros(30, 60))
    opt = create_optimizer(preset, [{"params": [p], "rank": 4}], lr=1e-3)
    (g, _), (g2, _) = rotating_stream(2, 0.01)
    p.grad = g
    opt.step()
    assert torch.equal(opt.state[p]["basis"], top_singular_basis(g, 4, False))
    assert opt.state[p]["trk_p_step"] == 0
    p.grad = g2
    opt.step()  # the second step moves P, a little
    moved = float(largest_principal_angle(orthonormalize(opt.state[p]["basis"]), top_singular_basis(g, 4, False)))
    assert 0.0 < moved < 0.1 and opt.state[p]["trk_p_step"] == 1


def test_p_weight_decay_follows_w_unless_set():
    tracker = get_tracker("online_pca")
    assert tracker.p_weight_decay({"weight_decay": 0.1}) == 0.1
    assert tracker.p_weight_decay({"weight_decay": 0.1, "p_weight_decay": 0.0}) == 0.0
    from gradspace import create_optimizer

    opt = create_optimizer("osd-code", [{"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2}],
                           weight_decay=0.1)
    assert tracker.p_weight_decay(opt.param_groups[0]) == 0.01  # the authors' code's own setting


@pytest.mark.parametrize(
    "tracker, bad",
    [("subtrack", {"eta": -1.0}), ("subtrack", {"eta": float("nan")}), ("subtrack", {"accumulate": 1}),
     ("subtrack", {"normalize": "yes"}), ("online_pca", {"alpha": 0.0}), ("online_pca", {"osd_lambda": -0.1}),
     ("online_pca", {"p_optimizer": "rmsprop"}), ("online_pca", {"p_lr_mode": "paper"}),
     ("online_pca", {"p_lr": 0.0}), ("online_pca", {"p_weight_decay": -1.0})],
)
def test_bad_hyperparameters_are_named(tracker, bad):
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        SubspaceOptimizer([{"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2}], tracker=tracker, **bad)


# --------------------------------------------------------------------------------------------------- resume
def run(tracker, data, options, resume_at=None):
    def optimizer(model):
        return SubspaceOptimizer(projected_groups(model, gap=5), lr=1e-2, weight_decay=0.01, tracker=tracker,
                                 **options)

    model = make_model()
    opt = optimizer(model)
    if resume_at is None:
        return train(model, opt, data)
    train(model, opt, data[:resume_at])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model = make_model(seed=1)  # fresh, different weights: everything must come from the checkpoint
    opt = optimizer(model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    return train(model, opt, data[resume_at:])


@pytest.mark.parametrize(
    "tracker, options",
    [("subtrack", {}), ("subtrack", {"accumulate": False}), ("online_pca", {}),
     ("online_pca", {"p_lr_mode": "code", "p_weight_decay": 0.01, "osd_lambda": 0.0, "p_optimizer": "sgd"})],
)
@pytest.mark.parametrize("resume_at", [10, 12])  # step 10 is a subspace update (gap 5); 12 lies between two
def test_resume_is_bit_identical(tracker, options, resume_at):
    data = batches(18)
    ref = run(tracker, data, options)
    resumed = run(tracker, data, options, resume_at)
    for (name, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
