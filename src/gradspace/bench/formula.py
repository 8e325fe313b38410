"""The closed-form optimizer-state formula: the bytes each component declares, summed over a model's weights, and
the variants (every preset plus a few options) it is checked on. A leaf of ``gradspace.bench``: ``memory`` checks it
against counted state, ``peak_memory``, ``real_memory`` and ``distributed_memory`` print it next to what they
measure."""

from __future__ import annotations

import math

import torch

from .. import update as outputs
from ..methods import METHODS
from ..optimizer import PROJECTION_DEFAULTS
from ..params import select_params
from ..rules import get_rule
from ..trackers import get_tracker

MiB = 2**20


def variants() -> list[tuple[str, str, dict]]:
    """(label, preset, extra options): every preset of METHODS, plus the 8-bit rule and SubTrack without its
    m x n accumulation buffer."""
    out = [(name, name, {}) for name in METHODS]
    i = next(i for i, v in enumerate(out) if v[0] == "subtrack") + 1
    out.insert(i, ("subtrack accumulate=False", "subtrack", {"accumulate": False}))
    out += [("adamw 8-bit", "adamw", {"base": "adamw8bit"}), ("galore 8-bit", "galore", {"base": "adamw8bit"})]
    return out


def projected_names(model: torch.nn.Module) -> set[str]:
    """Names of the weights the presets project by default (every projected group of ``select_params``)."""
    return {n for g in select_params(model) if "rank" in g for n in g["param_names"]}


def weight_bytes(shape, elem: int, method: str, rank: int, options: dict, clock=(1, 0)) -> int:
    """State bytes of one weight after its first step, from what each component declares: the inner rule's
    ``state_bytes`` for the (projected or full) gradient shape, the tracker's (basis included) for a projected
    m x n weight (k = the projected side, l = the other, rank r), and the output's limiter scalar (recovery,
    APOLLO). ``elem`` is the bytes of one state element; ``clock`` = (steps since the last refresh, refreshes),
    which adarank's bookkeeping reads. A full-rank preset, a non-2-D parameter or r >= min(m, n): the rule on
    the parameter's shape."""
    preset = METHODS[method]
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


def formula_bytes(model: torch.nn.Module, method: str, rank: int, options: dict, ranks=None, clocks=None) -> int:
    """Predicted state bytes of ``create_optimizer(method, model, rank=rank, **options)`` after one step.

    ``ranks``/``clocks`` (by parameter name) give adarank's effective ranks and refresh clocks, which come from the
    data and no formula can know; by default every weight has ``rank`` and has taken one step.
    """
    projected = projected_names(model) if METHODS[method] is not None else set()
    total = 0
    for name, p in model.named_parameters():
        r = (ranks or {}).get(name, rank) if name in projected else math.inf  # not projected: full rank
        total += weight_bytes(tuple(p.shape), p.element_size(), method, r, options, (clocks or {}).get(name, (1, 0)))
    return total


def projected_grad_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients of the weights the presets project (what layer-wise mode must at least save)."""
    names = projected_names(model)
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in names)
