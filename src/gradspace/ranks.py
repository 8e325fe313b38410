"""A rank per weight for a byte budget: spend the optimizer-state bytes where the gradient's energy is.

Each projected weight's rank starts at ``min_rank`` and grows, greedily, where the next ``step`` of rank captures
the most energy per byte it costs, until the next increment no longer fits the budget. The energy is each
weight's share of its gradient's squared Frobenius norm in its top singular values (every weight counts alike,
whatever its gradient's scale), measured on the gradients the weights hold (``p.grad``, e.g. after one backward)
or, where none exist yet, from the stated prior that singular values squared fall as 1/i (which then spends the
bytes by shape alone). Ranks stop at ``max_rank`` (default a quarter of the weight's smaller side, the papers'
d/4). The cost of a rank is the state formula each component declares (``gradspace.bench.formula``).
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import torch


def _spectrum(p: torch.Tensor, top: int) -> torch.Tensor:
    """Cumulative captured-energy shares of ranks 0..top (a tensor of top + 1 values, the first 0)."""
    k = min(p.shape)
    if p.grad is not None and p.grad.device.type != "meta":
        s2 = torch.linalg.svdvals(p.grad.detach().float()).square()
        shares = s2 / s2.sum().clamp(min=torch.finfo(torch.float32).tiny)
    else:  # the prior: sigma_i^2 ~ 1/i
        inv = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
        shares = inv / inv.sum()
    return torch.cat([torch.zeros(1, dtype=torch.float64), shares.double().cumsum(0)[:top]])


def allocate_ranks(
    weights: dict[str, torch.Tensor],
    budget: int,
    preset: dict[str, Any],
    base: str = "adamw",
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    step: int | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, int]:
    """``{name: rank}`` for the 2-D ``weights`` (projected by a method's ``preset``, ``gradspace.METHODS[name]``,
    with inner rule ``base``) whose state fits ``budget`` bytes (see the module docstring); an error if even
    ``min_rank`` everywhere does not fit."""
    from .state_formula import weight_state_bytes

    options = {**(options or {}), "base": base}

    def cost(p, r):
        return weight_state_bytes(tuple(p.shape), p.element_size(), preset, r, options)

    tops = {n: max(min_rank, max_rank or min(p.shape) // 4) for n, p in weights.items()}
    curves = {n: _spectrum(p, tops[n]) for n, p in weights.items()}
    ranks = dict.fromkeys(weights, min_rank)
    spent = sum(cost(p, min_rank) for p in weights.values())
    if spent > budget:
        raise ValueError(
            f"the budget of {budget:,} bytes does not hold even rank {min_rank} for every weight ({spent:,} bytes); "
            "raise it or project fewer weights"
        )
    heap: list[tuple[float, str, int, int]] = []

    def push(name: str) -> None:
        p, r = weights[name], ranks[name]
        inc = min(step or max(1, min(p.shape) // 64), tops[name] - r)
        if inc <= 0:
            return
        price = cost(p, r + inc) - cost(p, r)
        gain = float(curves[name][r + inc] - curves[name][r])
        heapq.heappush(heap, (-gain / max(price, 1), name, inc, price))

    for name in weights:
        push(name)
    while heap:
        _, name, inc, price = heapq.heappop(heap)
        if spent + price > budget:
            continue  # this increment does not fit; a smaller weight's may
        ranks[name] += inc
        spent += price
        push(name)
    return ranks


def budget_groups(
    groups: list[dict], budget: int | dict[str, int], preset: dict[str, Any], base: str, options: dict[str, Any]
) -> list[dict]:
    """``groups`` (``select_params``'s) with each projected group split by the rank ``allocate_ranks`` gives its
    weights, for a state budget of ``budget`` bytes over the whole model (full-rank parameters' state included);
    or by the ranks ``budget`` maps each weight's name to (an allocation recorded earlier, e.g. by a run)."""
    from .state_formula import weight_state_bytes

    projected = {n: p for g in groups if "rank" in g for n, p in zip(g["param_names"], g["params"])}
    if isinstance(budget, dict):
        missing = sorted(set(projected) - set(budget))
        if missing:
            raise ValueError(f"the recorded ranks name no rank for {', '.join(missing[:3])}: another model")
        ranks = {n: int(budget[n]) for n in projected}
    else:
        rest = [p for g in groups if "rank" not in g for p in g["params"]]
        fixed = sum(weight_state_bytes(tuple(p.shape), p.element_size(), None, math.inf, {"base": base}) for p in rest)
        options = dict(options)
        max_rank = options.pop("max_rank", None)
        ranks = allocate_ranks(projected, budget - fixed, preset, base, max_rank=max_rank, options=options)
    out = []
    for g in groups:
        if "rank" not in g:
            out.append(g)
            continue
        by_rank: dict[int, dict] = {}
        for name, p in zip(g["param_names"], g["params"]):
            sub = by_rank.setdefault(ranks[name], {**g, "params": [], "param_names": [], "rank": ranks[name]})
            sub["params"].append(p)
            sub["param_names"].append(name)
        out.extend(by_rank[r] for r in sorted(by_rank, reverse=True))
    return out
