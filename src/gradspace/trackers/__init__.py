"""Trackers: how each method finds and moves its subspace (one file per family), and their registry."""

from ..components import check_declarations, register, unregister
from .adarank import AdaRankTracker
from .base import Context, Tracker
from .gaussian import GaussianTracker
from .lazy_svd import LazySVDTracker
from .online_pca import OnlinePCATracker
from .random_walk import GrassJumpTracker, GrassWalkTracker
from .subtrack import SubTrackTracker
from .svd import SVDTracker

TRACKERS: dict[str, Tracker] = {}


def register_tracker(name: str, tracker: Tracker, *, replace: bool = False) -> Tracker:
    """Make ``tracker`` (an instance of a ``Tracker`` subclass that implements ``init`` and ``update``) available
    as ``SubspaceOptimizer(..., tracker=name)``; its declarations are checked here (``gradspace.components``)."""
    check_declarations("tracker", name, tracker, Tracker, ("init", "update"))
    return register(TRACKERS, "tracker", name, tracker, replace=replace)


def unregister_tracker(name: str) -> None:
    unregister(TRACKERS, "tracker", name)


for _tracker in (
    SVDTracker(),
    LazySVDTracker(),
    AdaRankTracker(),
    GrassWalkTracker(),
    GrassJumpTracker(),
    GaussianTracker(),
    SubTrackTracker(),
    OnlinePCATracker(),
):
    register_tracker(_tracker.name, _tracker)


def get_tracker(name: str) -> Tracker:
    try:
        return TRACKERS[name]
    except KeyError:
        raise ValueError(f"unknown tracker {name!r}; choose one of {', '.join(sorted(TRACKERS))}") from None


__all__ = ["TRACKERS", "Context", "Tracker", "get_tracker", "register_tracker", "unregister_tracker"]
