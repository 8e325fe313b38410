"""What a run reports: its summary.json (with the curves logged before a resume), and whether it diverged."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any


def peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class RunDiverged(Exception):
    """The run finished and was saved, but its loss ended well above where it started (exit code 3)."""


#: a run whose last steps' mean train loss is this much above its first steps' (relatively) has diverged; runs
#: shorter than DIVERGENCE_MIN_STEPS are judged only by non-finite losses (a few noisy batches say nothing)
DIVERGENCE_MARGIN = 0.5
DIVERGENCE_MIN_STEPS = 20


def has_diverged(history: list[dict[str, Any]], train_loss: float) -> bool:
    finite = [r["loss"] for r in history if math.isfinite(r["loss"])]
    if not finite or not math.isfinite(train_loss):
        return True
    if len(history) < DIVERGENCE_MIN_STEPS:
        return False
    window = max(1, min(10, len(history) // 10))
    first = sum(finite[:window]) / len(finite[:window])
    return train_loss > first * (1 + DIVERGENCE_MARGIN)


def logged_before(metrics_path: Path) -> tuple[list[dict], list[dict], float]:
    """(loss curve, evaluations, elapsed seconds) that a resumed run's metrics.jsonl holds from before its
    checkpoint; each curve point is the mean over its logging window."""
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    train = [x for x in lines if x.get("type") == "train"]
    evals = [{k: v for k, v in x.items() if k != "type"} for x in lines if x.get("type") == "eval"]
    return (
        [{"step": x["step"], "loss": x["loss"]} for x in train],
        evals,
        float(train[-1].get("elapsed", 0.0) if train else 0.0),
    )


def build_summary(cfg, start, optimizer, device, *, history, evals, wall_time, extra, **figures) -> dict[str, Any]:
    """summary.json: the run's figures, optimizer diagnostics (state, per-weight rank and energy) and settings."""
    diag = optimizer.diagnostics()
    return {
        "method": cfg["method"],
        "steps": cfg["steps"],
        "start_step": start,
        **figures,
        "wall_time": wall_time,
        "update_seconds": diag["update_seconds"],
        "state_bytes": diag["state_bytes"],
        "peak_memory": peak_memory(device),
        "history": history,
        "evals": evals,
        "weights": {
            name: {"rank": w["rank"], "energy": w["energy"], "updates": w["updates"], "state_bytes": w["state_bytes"]}
            for name, w in diag["weights"].items()
        },
        **extra,
    }


def logged_by(line: str, step: int) -> bool:
    """A metrics.jsonl line written at or before ``step`` (a half-written last line, from a killed run, is dropped)."""
    try:
        return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
        return False
