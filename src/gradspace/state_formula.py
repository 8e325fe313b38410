"""The optimizer-state bytes of one weight from what each component declares: the closed-form formula that
``gradspace.bench memory`` checks against counted state, used by the memory planner and the rank budget. A leaf
of the optimizer's modules (it takes a method's preset, not its name, so ``methods`` may use it)."""

from __future__ import annotations

from . import update as outputs
from .optimizer import PROJECTION_DEFAULTS
from .rules import get_rule
from .trackers import get_tracker


def weight_state_bytes(shape, elem: int, preset: dict | None, rank: int, options: dict, clock=(1, 0)) -> int:
    """State bytes of one weight after its first step, from what each component declares: the inner rule's
    ``state_bytes`` for the (projected or full) gradient shape, the tracker's (basis included) for a projected
    m x n weight (k = the projected side, l = the other, rank r), and the output's limiter scalar (recovery,
    APOLLO). ``elem`` is the bytes of one state element; ``clock`` = (steps since the last refresh, refreshes),
    which adarank's bookkeeping reads. A full-rank preset, a non-2-D parameter or r >= min(m, n): the rule on
    the parameter's shape."""
    group = {**PROJECTION_DEFAULTS, **(preset or {}), **options}
    rule = get_rule(group.get("base", "adamw"))
    group = {**rule.defaults, **group}
    if preset is None or len(shape) != 2 or rank >= min(shape):
        return rule.state_bytes(tuple(shape), elem, group)
    tracker = get_tracker(group["tracker"])
    group = {**tracker.defaults, **group}
    k, l = min(shape), max(shape)
    total = tracker.state_bytes(k, l, rank, group, clock) + rule.state_bytes((rank, l), elem, group)
    return total + outputs.state_bytes(group)
