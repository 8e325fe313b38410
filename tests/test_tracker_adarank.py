"""Tracker ``adarank`` (AdaRankGrad): the rank by threshold (both criteria and bases, r_min), refresh times, checks."""

import pytest
import torch
from torch import nn

from conftest import CTX, batches, make_model, projected_groups, train, with_spectrum
from gradspace import SubspaceOptimizer
from gradspace.components import TrackerState
from gradspace.optimizer import state_bytes
from gradspace.trackers import Context, get_tracker
from gradspace.trackers.base import orthonormality_error, seeded_generator


# ---------------------------------------------------------------------------------------------- adarank: rank
def test_adarank_picks_the_smallest_rank_meeting_the_threshold():
    """Exponential and power-law spectra (the gradient spectra the paper shows), random thresholds."""
    k, l, r_max = 64, 96, 24
    tracker, hits = get_tracker("adarank"), 0
    for i in range(100):
        gen = torch.Generator().manual_seed(i)
        x = torch.arange(k, dtype=torch.float64)
        decay = float(torch.rand(1, generator=gen, dtype=torch.float64))
        s = torch.exp(-(0.05 + 0.45 * decay) * x) if i % 2 else (x + 1) ** -(0.5 + 1.5 * decay)
        eta_th = 0.05 + 0.45 * float(torch.rand(1, generator=gen))
        g = with_spectrum(s, k, l, gen)
        err = 1 - torch.cumsum(s**2, 0) / (s**2).sum()  # exact prefix errors
        want = min(int((err <= eta_th).nonzero()[0]) + 1, r_max)
        state = TrackerState({"step": 0, "updates": 0})
        basis = tracker.init(g, r_max, state, {"eta_th": eta_th}, Context(index=i, right=False, seed=0))
        r = basis.shape[1]
        hits += r == want
        # the randomised estimate can only under-capture: the rank is never too small, and the basis really
        # meets the threshold on G
        assert r >= want
        assert orthonormality_error(basis) < 1e-4
        dropped = (g - basis @ (basis.mT @ g)).square().sum() / g.square().sum()
        assert dropped <= eta_th + 1e-5 or r == r_max
        assert float(state["trk_diag_error"]) == pytest.approx(float(dropped), abs=1e-4)
    assert hits >= 95, hits


def test_adarank_respects_r_min_and_r_max():
    gen = torch.Generator().manual_seed(0)
    g = with_spectrum(torch.tensor([1.0] + [1e-3] * 9, dtype=torch.float64), 32, 48, gen)  # rank one, nearly
    state = TrackerState({"step": 0, "updates": 0})
    assert get_tracker("adarank").init(g, 8, state, {"r_min": 3}, CTX).shape == (32, 3)
    flat = with_spectrum(torch.ones(30, dtype=torch.float64), 32, 48, gen)  # error(r) = (30 - r) / 30
    assert get_tracker("adarank").init(flat, 8, state, {"eta_th": 0.12}, CTX).shape == (32, 8)  # r_max caps
    assert get_tracker("adarank").init(flat, 8, state, {"eta_th": 0.12, "r_max": 40}, CTX).shape == (32, 27)


# A gradient of exact rank 10 < r_max: the range finder spans its range, so the ordered basis is its top
# singular vectors and the chosen rank is exactly what the formulas give from s.
S10 = torch.tensor([3.0, 2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.4, 0.3, 0.2], dtype=torch.float64)


def by_hand(s: torch.Tensor, eta_th: float, squared: bool, r_min: int = 1) -> int:
    """Smallest r >= r_min with ||G - S_r S_r^T G||_F^2 / ||G||_F^2 <= eta_th (squared, eq. 2) or
    ||G - S_r S_r^T G||_F / ||G||_F <= eta_th (unsquared, Algorithm 2's box), from the singular values."""
    for r in range(r_min, len(s) + 1):
        err = float((s[r:] ** 2).sum() / (s**2).sum())
        if (err if squared else err**0.5) <= eta_th:
            return r
    raise AssertionError("no rank meets the threshold")


@pytest.mark.parametrize("eta_th", [0.48, 0.3, 0.2, 0.1, 0.05])
@pytest.mark.parametrize("criterion", ["squared", "unsquared"])
def test_adarank_rank_is_the_smallest_meeting_each_criterion(criterion, eta_th):
    want = by_hand(S10, eta_th, squared=criterion == "squared")
    for i in range(5):
        g = with_spectrum(S10, 48, 80, torch.Generator().manual_seed(i))
        state = TrackerState({"step": 0, "updates": 0})
        group = {"eta_th": eta_th, "criterion": criterion}
        basis = get_tracker("adarank").init(g, 16, state, group, Context(index=i, right=False, seed=0))
        assert basis.shape == (48, want)
        dropped = float((g - basis @ (basis.mT @ g)).square().sum() / g.square().sum())
        assert float(state["trk_diag_error"]) == pytest.approx(dropped, abs=1e-5)  # always the squared error
        assert (dropped if criterion == "squared" else dropped**0.5) <= eta_th


def test_the_two_criteria_differ_on_this_spectrum():
    """The test above distinguishes them: at the paper's 0.48, squared keeps 2 directions, unsquared 3."""
    assert (by_hand(S10, 0.48, True), by_hand(S10, 0.48, False)) == (2, 3)
    assert all(by_hand(S10, e, True) < by_hand(S10, e, False) for e in (0.3, 0.2, 0.1, 0.05))


def range_finder(g: torch.Tensor, r_max: int, power_iters: int, ctx=CTX, draw=0) -> torch.Tensor:
    """Algorithm 1 (plus power iterations), written out with the tracker's generator draw."""
    omega = torch.randn(g.shape[1], r_max, generator=seeded_generator(ctx, draw, g.device))
    q = torch.linalg.qr(g @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(g @ (g.mT @ q)).Q
    return q


@pytest.mark.parametrize("power_iters", [0, 2])
@pytest.mark.parametrize("criterion", ["squared", "unsquared"])
def test_adarank_prefix_basis_is_the_range_finders_own_columns(power_iters, criterion):
    gen = torch.Generator().manual_seed(3)
    s = (torch.arange(64, dtype=torch.float64) + 1) ** -0.8  # power law: full rank, no exact answer
    g, r_max, eta_th = with_spectrum(s, 64, 96, gen), 24, 0.3
    q = range_finder(g, r_max, power_iters)
    # prefix errors from the row energies of Q^T G, in the criterion's units
    err = 1 - torch.cumsum((q.mT @ g).double().square().sum(1), 0) / g.double().square().sum()
    meets = err if criterion == "squared" else err.clamp_min(0).sqrt()
    want = int((meets <= eta_th).nonzero()[0]) + 1 if (meets <= eta_th).any() else r_max
    group = {"eta_th": eta_th, "criterion": criterion, "power_iters": power_iters}
    state = TrackerState({"step": 0, "updates": 0})
    prefix = get_tracker("adarank").init(g, r_max, state, {**group, "basis": "prefix"}, CTX)
    assert prefix.shape == (64, want)
    torch.testing.assert_close(prefix, q[:, :want], rtol=0, atol=1e-6)
    dropped = (g - prefix @ (prefix.mT @ g)).square().sum() / g.square().sum()
    assert float(state["trk_diag_error"]) == pytest.approx(float(dropped), abs=1e-5)
    # the ordered basis rotates inside the same span: the best prefixes of span(Q), so never a higher rank
    ordered = get_tracker("adarank").init(g, r_max, TrackerState({"step": 0, "updates": 0}), group, CTX)
    assert ordered.shape[1] <= want
    assert not torch.allclose(ordered[:, :1].abs(), prefix[:, :1].abs(), atol=1e-3)
    top = torch.linalg.svd(g.double()).U[:, 0].float()
    assert float((ordered[:, 0] @ top).abs()) > float((prefix[:, 0] @ top).abs())  # ordered leads with u_1


@pytest.mark.parametrize("basis", ["ordered", "prefix"])
@pytest.mark.parametrize("criterion", ["squared", "unsquared"])
@pytest.mark.parametrize("r_min", [1, 3, 6, 12])
def test_adarank_r_min_floors_the_rank(r_min, criterion, basis):
    g = with_spectrum(S10, 48, 80, torch.Generator().manual_seed(0))
    if basis == "ordered":
        want = by_hand(S10, 0.48, squared=criterion == "squared")  # 2 or 3 without a floor
    else:
        err = 1 - torch.cumsum((range_finder(g, 16, 2).mT @ g).double().square().sum(1), 0) / g.square().sum()
        ok = (err if criterion == "squared" else err.clamp_min(0).sqrt()) <= 0.48
        want = int(ok.nonzero()[0]) + 1
    group = {"r_min": r_min, "criterion": criterion, "basis": basis}
    state = TrackerState({"step": 0, "updates": 0})
    assert get_tracker("adarank").init(g, 16, state, group, CTX).shape == (48, max(r_min, want))


def test_adarank_r_min_holds_through_training():
    data = batches(20)
    model = make_model()
    opt = SubspaceOptimizer(
        projected_groups(model, rank=6, gap=5), lr=1e-2, tracker="adarank", moments="rotate", min_gap=1, r_min=4
    )
    seen = set()
    for x, y in data:
        train(model, opt, [(x, y)])
        seen |= {st["basis"].shape[1] for st in opt.state.values() if "basis" in st}
    assert min(seen) >= 4, seen
    assert all(st["updates"] >= 3 for st in opt.state.values() if "basis" in st)


@pytest.mark.parametrize("criterion, first_refresh", [("squared", 10), ("unsquared", 2)])
def test_adarank_stale_trigger_uses_the_criterion(criterion, first_refresh):
    """Captured energy 0.6: stale for 'unsquared' (residual ratio sqrt(0.4) = 0.63 > 0.48), not for 'squared'
    (error 0.4 <= 0.48); the norm trigger is off (varsigma 0), so 'squared' waits for max_gap."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(32, 2, generator=gen) @ torch.randn(2, 64, generator=gen)
    p = nn.Parameter(torch.zeros(32, 64))
    opt = SubspaceOptimizer(
        [{"params": [p], "rank": 4}],
        lr=1e-3,
        tracker="adarank",
        moments="rotate",
        criterion=criterion,
        r_min=4,
        varsigma=0.0,
        min_gap=2,
        max_gap=10,
    )
    p.grad = g.clone()
    opt.step()
    s = opt.state[p]["basis"]
    z = torch.randn(32, 64, generator=gen)
    z -= s @ (s.mT @ z)  # outside the basis
    z *= (g.square().sum() * (1 / 0.6 - 1) / z.square().sum()).sqrt()
    h = g + z
    assert float((s.mT @ h).square().sum() / h.square().sum()) == pytest.approx(0.6, abs=1e-4)
    for t in range(1, 12):  # noqa: B007 - the step of the first refresh, read after the loop
        p.grad = h.clone()
        opt.step()
        if opt.state[p]["updates"]:
            break
    assert t == first_refresh


def run_manual(opt, p, grads):
    """Feed given gradients; return (rank, diagnostics) after every step."""
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append((opt.state[p]["basis"].shape[1], opt.diagnostics()))
    return out


def test_adarank_rank_follows_the_gradient_rank_down_and_memory_shrinks():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(32, 12, generator=gen)).Q
    p = nn.Parameter(torch.zeros(32, 64))
    opt = SubspaceOptimizer(
        [{"params": [p], "rank": 16}], lr=1e-3, tracker="adarank", moments="rotate", eta_th=0.05, max_gap=5, min_gap=1
    )

    def grads(rank, n):
        return [u[:, :rank] @ torch.linalg.qr(torch.randn(64, rank, generator=gen)).Q.mT for _ in range(n)]

    hist = run_manual(opt, p, grads(12, 12) + grads(4, 12))
    ranks = [r for r, _ in hist]
    assert ranks[:12] == [12] * 12  # flat rank-12 spectrum: error at 11 is about 1/12 > 0.05
    assert ranks[-1] == 4 and min(ranks) == 4
    before, after = hist[11][1]["weights"]["param0"], hist[-1][1]["weights"]["param0"]
    assert (before["rank"], after["rank"]) == (12, 4)
    assert after["state_bytes"] == state_bytes(opt.state[p]) == hist[-1][1]["state_bytes"]
    # basis 32 x r and Adam's two r x 64 moments, float32: a dropped direction frees (32 + 2 * 64) * 4 bytes
    assert before["state_bytes"] - after["state_bytes"] == (12 - 4) * (32 + 2 * 64) * 4
    assert opt.state[p]["rule"]["exp_avg"].shape == (4, 64)
    assert after["trk_diag_error"] < 0.05


# ------------------------------------------------------------------------------------ adarank: update times
def refresh_steps(grads, **opts):
    p = nn.Parameter(torch.zeros(32, 64))
    groups = [{"params": [p], "rank": 4}]
    opt = SubspaceOptimizer(groups, lr=1e-3, tracker="adarank", moments="rotate", **opts)
    steps, last = [], 0
    for t, g in enumerate(grads):
        p.grad = g
        opt.step()
        if opt.state[p]["updates"] != last:
            steps.append(t)
            last = opt.state[p]["updates"]
    return steps, opt.state[p]


def test_adarank_refresh_respects_min_gap_when_the_criteria_always_fire():
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randn(32, 64, generator=gen) for _ in range(30)]  # rank-4 basis: ~4/32 of the energy
    steps, state = refresh_steps(noise, min_gap=3, max_gap=10)
    assert steps == list(range(3, 30, 3))
    assert float(state["tracker"]["trk_diag_gap"]) == 3


def test_adarank_refresh_respects_max_gap_when_the_criteria_never_fire():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(32, 2, generator=gen) @ torch.randn(2, 64, generator=gen)  # fully captured, constant norm
    steps, state = refresh_steps([g] * 30, min_gap=2, max_gap=7)
    assert steps == [7, 14, 21, 28]
    assert float(state["tracker"]["trk_diag_gap"]) == 7


def test_adarank_refreshes_the_step_after_the_projected_gradient_halves():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(32, 2, generator=gen) @ torch.randn(2, 64, generator=gen)
    grads = [g] * 7 + [0.3 * g] * 10  # step 7 sees the drop, step 8 (one-step lag) refreshes
    steps, _ = refresh_steps(grads, min_gap=3, max_gap=20, varsigma=0.5)
    assert steps == [8]
    steps, _ = refresh_steps([g] * 2 + [0.3 * g] * 10, min_gap=5, max_gap=20)
    assert steps == [5]  # not before min_gap; and the reference norm is the new one afterwards


BAD_OPTIONS = [
    ({"eta_th": 1.0}, "eta_th"),
    ({"r_min": 0}, "r_min"),
    ({"r_min": 9}, "r_min"),
    ({"min_gap": 9, "max_gap": 4}, "min_gap"),
    ({"power_iters": -1}, "power_iters"),
    ({"varsigma": 2.0}, "varsigma"),
    ({"moments": "keep"}, "keep"),
    ({"criterion": "relative"}, "criterion must be one of 'squared', 'unsquared'"),
    ({"criterion": "Squared"}, "criterion"),
    ({"basis": "svd"}, "basis must be one of 'ordered', 'prefix'"),
    ({"r_min": 2.5}, "r_min"),
    ({"r_min": True}, "r_min"),
]


@pytest.mark.parametrize("opts, match", BAD_OPTIONS)
def test_adarank_validation(opts, match):
    p = nn.Parameter(torch.zeros(32, 64))
    kw = {"moments": "rotate", **opts}
    with pytest.raises(ValueError, match=match):
        SubspaceOptimizer([{"params": [p], "rank": 8}], tracker="adarank", **kw)
