"""Trackers: how each method finds and moves its subspace (one file per family)."""

from .adarank import AdaRankTracker
from .base import Context, Tracker
from .gaussian import GaussianTracker
from .online_pca import OnlinePCATracker
from .random_walk import GrassJumpTracker, GrassWalkTracker
from .subtrack import SubTrackTracker
from .svd import SVDTracker

TRACKERS: dict[str, Tracker] = {
    t.name: t
    for t in (
        SVDTracker(),
        AdaRankTracker(),
        GrassWalkTracker(),
        GrassJumpTracker(),
        GaussianTracker(),
        SubTrackTracker(),
        OnlinePCATracker(),
    )
}


def get_tracker(name: str) -> Tracker:
    try:
        return TRACKERS[name]
    except KeyError:
        raise ValueError(f"unknown tracker {name!r}; choose one of {', '.join(sorted(TRACKERS))}") from None


__all__ = ["TRACKERS", "Context", "Tracker", "get_tracker"]
