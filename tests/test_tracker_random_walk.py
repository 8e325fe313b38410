"""Trackers ``grasswalk`` and ``grassjump``: geodesic steps of length eta, fresh random subspaces, validation."""

import pytest
import torch
from torch import nn

from conftest import principal_angles
from gradspace import SubspaceOptimizer
from gradspace.components import TrackerState
from gradspace.trackers import Context, get_tracker
from gradspace.trackers.base import orthonormality_error


def test_grasswalk_validation():
    groups = [{"params": [nn.Parameter(torch.zeros(8, 9))], "rank": 2}]
    with pytest.raises(ValueError, match="eta"):
        SubspaceOptimizer(groups, tracker="grasswalk", eta=2.0)


# ---------------------------------------------------------------------------------------- random trackers
def start(name, k=64, r=8, seed=0, index=0):
    gen = torch.Generator().manual_seed(123)
    state = {"step": 0, "updates": 0}
    ctx = Context(index=index, right=False, seed=seed)
    state["basis"] = get_tracker(name).init(torch.randn(k, 40, generator=gen), r, TrackerState(state), {}, ctx)
    return state, ctx


@pytest.mark.parametrize("eta, k", [(0.05, 64), (0.3, 64), (1.0, 64), (1.0, 10)])  # k=10 < 2r: H is singular
def test_grasswalk_moves_a_geodesic_distance_eta_and_stays_orthonormal(eta, k):
    tracker = get_tracker("grasswalk")
    state, ctx = start("grasswalk", k=k)
    for _ in range(50):
        new = tracker.update(torch.empty(k, 40), TrackerState(state), {"eta": eta}, ctx)
        theta = principal_angles(state["basis"], new)
        assert float(theta.norm()) == pytest.approx(eta, abs=2e-3)  # sqrt(sum theta_i^2)
        assert float(theta.max()) < eta
        state["basis"], state["updates"] = new, state["updates"] + 1
    assert orthonormality_error(state["basis"]) <= 1e-4  # the re-orthonormalisation threshold


def test_grassjump_bases_are_orthonormal_fresh_and_reproducible():
    tracker = get_tracker("grassjump")
    gn = torch.empty(64, 40)
    state, ctx = start("grassjump")
    a = tracker.update(gn, TrackerState(state), {}, ctx)
    assert orthonormality_error(a) < 1e-5
    assert torch.equal(a, tracker.update(gn, TrackerState(state), {}, ctx))  # same (seed, index, update count)
    assert principal_angles(state["basis"], a).max() > 0.5  # a jump, not a step
    state["updates"] += 1
    assert not torch.allclose(a, tracker.update(gn, TrackerState(state), {}, ctx))  # next update: a new draw
    other, ctx1 = start("grassjump", index=1)
    assert not torch.allclose(a, tracker.update(gn, TrackerState(other), {}, ctx1))  # another parameter
    other, ctx2 = start("grassjump", seed=1)
    assert not torch.allclose(a, tracker.update(gn, TrackerState(other), {}, ctx2))  # another seed
