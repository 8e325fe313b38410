"""Several seeds of one method: the mean and standard deviation of each figure, and the rule that says when a
difference between two methods is noise."""

from __future__ import annotations

import math
import statistics
from typing import Any

#: the figures of a run summary that are averaged over seeds (a task's metric is added by name)
FIGURES = (
    "val_loss",
    "val_ppl",
    "train_loss",
    "final_loss",
    "wall_time",
    "tokens_per_s",
    "update_seconds",
    "state_bytes",
    "peak_memory",
)
NOISE_RULE = (
    "a difference between two methods is within noise when it is no larger than the sum of their standard "
    "deviations over seeds (|mean_a - mean_b| <= sd_a + sd_b); with one seed the spread is unknown and no "
    "difference is called real"
)


def aggregate(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One method's seeds -> a summary-shaped dict: each figure the mean over the seeds that did not diverge,
    ``spread`` their standard deviations (n >= 2), ``n``, ``seeds``, ``diverged_seeds``; the per-layer figures
    and history are the first seed's, ``curves`` the per-seed validation and training curves."""
    seeds = sorted(runs)
    good = [s for s in seeds if not runs[s].get("diverged")]
    first = runs[(good or seeds)[0]]
    metric = first.get("metric")
    out: dict[str, Any] = {k: v for k, v in first.items() if k not in FIGURES}
    out.update(
        n=len(good),
        seeds=seeds,
        diverged_seeds=[s for s in seeds if s not in good],
        diverged=not good,
        spread={},
        curves={s: {"evals": runs[s].get("evals", []), "history": runs[s].get("history", [])} for s in good},
    )
    for key in (*FIGURES, *([metric] if metric else [])):
        values = [float(runs[s][key]) for s in good if isinstance(runs[s].get(key), (int, float))]
        if not values:
            out[key] = math.nan
            continue
        out[key] = statistics.fmean(values)
        if len(values) > 1:
            out["spread"][key] = statistics.stdev(values)
    return out


def within_noise(a: dict[str, Any], b: dict[str, Any], key: str) -> bool | None:
    """True when ``a`` and ``b`` differ in ``key`` by no more than the sum of their spreads; None when either has
    fewer than two seeds (no spread to judge by)."""
    sa, sb = (a.get("spread") or {}).get(key), (b.get("spread") or {}).get(key)
    if sa is None or sb is None:
        return None
    return abs(a[key] - b[key]) <= sa + sb


def best_and_ties(results: dict[str, dict[str, Any]], key: str, lower: bool = True) -> tuple[str, list[str]]:
    """The method with the best mean ``key`` and the methods within noise of it (in the order given)."""
    finite = {m: r for m, r in results.items() if not r.get("diverged") and math.isfinite(r.get(key, math.nan))}
    if not finite:
        return "", []
    best = (min if lower else max)(finite, key=lambda m: finite[m][key])
    ties = [m for m, r in finite.items() if m != best and within_noise(r, finite[best], key)]
    return best, ties
