"""svd_sign="canonical": every basis an SVD gives is independent of the signs LAPACK returns (scikit-learn's
svd_flip convention), for every tracker that takes SVDs, exact and randomized."""

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import batches, make_model, projected_groups, train
from gradspace import SubspaceOptimizer, create_optimizer, optimizer_state_bytes
from gradspace.components import TrackerState
from gradspace.trackers import Context, get_tracker, svd
from test_optimizer import roundtrip

SVD_TRACKERS = ("svd", "subtrack", "online_pca", "grasswalk", "grassjump")
spec = importlib.util.spec_from_file_location(
    "sensitivity", Path(__file__).parent.parent / "tools" / "svd_sign_sensitivity.py"
)
sensitivity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sensitivity)


@pytest.fixture
def flipped_solvers(monkeypatch):
    """LAPACK's SVD, and the small eigensolve of the randomized SVD and of adarank, returning singular vectors
    negated: as valid a decomposition as the one they return, with other signs. Which ones alternates from call to
    call, as LAPACK's flips come and go (a flip that every basis shares would meet moments of the same sign)."""
    exact, small, calls = torch.linalg.svd, svd.left_singular, [0]

    def signs(n: int) -> torch.Tensor:
        calls[0] += 1
        return torch.tensor([(-1.0) ** (i + calls[0]) for i in range(n)])

    def flipped_svd(a, full_matrices=True):
        u, s, vh = exact(a, full_matrices=full_matrices)
        d = signs(s.shape[-1])
        return u * d, s, vh * d[:, None]

    def flipped_small(b):
        vecs, evals = small(b)
        return vecs * signs(vecs.shape[1]), evals

    def install():
        monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
        monkeypatch.setattr(svd, "left_singular", flipped_small)
        monkeypatch.setattr("gradspace.trackers.adarank.left_singular", flipped_small)

    return install


def first_basis(tracker, method, sign, right):
    gen = torch.Generator().manual_seed(0)
    gn = torch.randn(24, 16, generator=gen) @ torch.randn(16, 40, generator=gen)
    group = {**projected_groups(make_model())[0], "tracker": tracker, "svd": method, "svd_sign": sign}
    group = {**get_tracker(tracker).defaults, **group}
    return get_tracker(tracker).init(gn, 6, TrackerState({"step": 0}), group, Context(0, right, 0))


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize(
    ("tracker", "method"),
    [*((t, m) for t in SVD_TRACKERS for m in ("exact", "randomized")), ("adarank", "its own range finder")],
)
def test_the_canonical_basis_does_not_depend_on_the_solvers_signs(tracker, method, right, flipped_solvers):
    lapack, canonical = first_basis(tracker, method, "lapack", right), first_basis(tracker, method, "canonical", right)
    flipped_solvers()
    assert not torch.equal(first_basis(tracker, method, "lapack", right), lapack)  # the solvers' signs did change
    assert torch.equal(first_basis(tracker, method, "canonical", right), canonical)
    top = canonical.gather(0, canonical.abs().argmax(0, keepdim=True))
    assert (top > 0).all() and torch.equal(canonical.abs(), lapack.abs())  # only signs: the same vectors


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_with_canonical_signs_galore_trains_the_same_whatever_signs_the_solver_returns(method, flipped_solvers):
    """A refresh keeps the moments, so LAPACK's sign reaches the weights; with canonical signs it does not."""
    data = batches(25)

    def weights(sign):
        model = make_model()
        train(model, SubspaceOptimizer(projected_groups(model, gap=10, svd=method, svd_sign=sign), lr=1e-2), data)
        return [p.detach().clone() for p in model.parameters()]

    lapack, canonical = weights("lapack"), weights("canonical")
    flipped_solvers()
    assert not all(torch.equal(a, b) for a, b in zip(weights("lapack"), lapack))
    assert all(torch.equal(a, b) for a, b in zip(weights("canonical"), canonical))


@pytest.mark.parametrize("seed", [2, 3])
def test_with_canonical_signs_a_1e_7_change_of_the_gradients_stays_small(seed):
    """The README's figure: random rank-16 gradients on which LAPACK's signs flip under a 1e-7 change here
    (the trajectories part by 0.2 and 0.4 of the distance moved) move by less than 1e-4 with canonical signs."""
    runs = [sensitivity.trajectory(seed, 50, "canonical", noise) for noise in (0.0, 1e-7)]
    assert sensitivity.difference(runs[1], runs[0]) < 1e-4


def test_the_option_resumes_exactly_costs_no_state_and_is_validated():
    data = batches(14)
    groups = lambda m, **kw: projected_groups(m, rank=4, gap=5, **kw)  # noqa: E731
    a = make_model()
    opt = SubspaceOptimizer(groups(a, svd_sign="canonical"), lr=1e-2)
    train(a, opt, data)
    b = make_model()
    opt_b = SubspaceOptimizer(groups(b, svd_sign="canonical"), lr=1e-2)
    train(b, opt_b, data[:7])
    saved = roundtrip(opt_b.state_dict())
    assert saved["param_groups"][0]["svd_sign"] == "canonical"
    opt_b = SubspaceOptimizer(groups(b, svd_sign="canonical"), lr=1e-2)
    opt_b.load_state_dict(saved)
    train(b, opt_b, data[7:])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    lapack = make_model()
    opt_l = SubspaceOptimizer(groups(lapack), lr=1e-2)
    train(lapack, opt_l, data)
    assert optimizer_state_bytes(opt_l) == optimizer_state_bytes(opt)
    with pytest.raises(ValueError, match="svd_sign must be 'lapack'"):
        SubspaceOptimizer(groups(make_model(), svd_sign="positive"))
    with pytest.raises(ValueError, match="svd_sign must be 'lapack'"):
        create_optimizer("adarank", groups(make_model()), svd_sign=True)
    with pytest.raises(ValueError, match="does not apply"):
        create_optimizer("apollo", make_model(), target_modules=["up"], rank=4, svd_sign="canonical")
