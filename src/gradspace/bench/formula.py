"""The closed-form optimizer-state formula: the bytes each component declares, summed over a model's weights, and
the variants (every preset plus a few options) it is checked on. A leaf of ``gradspace.bench``: ``memory`` checks it
against counted state, ``peak_memory``, ``real_memory`` and ``distributed_memory`` print it next to what they
measure."""

from __future__ import annotations

import math

import torch

from ..methods import METHODS
from ..params import select_params
from ..state_formula import weight_state_bytes

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
    """``gradspace.state_formula.weight_state_bytes`` of method ``method``'s preset."""
    return weight_state_bytes(shape, elem, METHODS[method], rank, options, clock)


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
