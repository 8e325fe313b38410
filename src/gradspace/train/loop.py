"""A training loop short enough to read in one sitting, shared by the demo and the CLI.

It returns what happened as data (one dict per step, one per evaluation) and renders nothing itself: callers
show progress through ``callback``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Mean loss and perplexity of a causal LM over fixed batches; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = _device(model)
    total = 0.0
    for input_ids, labels in batches:
        total += model(input_ids=input_ids.to(device), labels=labels.to(device)).loss.item()
    model.train(was_training)
    loss = total / max(1, len(batches))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _model_inputs(batch: Batch | dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A causal-LM ``(input_ids, labels)`` pair, or a dict of model inputs (classification batches), on ``device``."""
    if not isinstance(batch, dict):
        batch = {"input_ids": batch[0], "labels": batch[1]}
    return {k: v.to(device) for k, v in batch.items()}


def _token_shares(window: list, world: int = 1, token_total: Callable[[int], int] | None = None) -> list[float | None]:
    """Each micro-batch's weight in its step: None for ``1 / grad_accum``, or, for batches whose loss is a mean over
    their labelled tokens (instruction tuning: labels -100 outside the responses), its share of the step's
    labelled tokens, so that accumulating micro-batches gives the gradient of the whole batch (the
    ``num_items_in_batch`` correction of transformers 4.46).

    Under torchrun (``world`` > 1) the step's batch is every rank's windows together, and DDP, FSDP2 and layer-wise
    data parallelism average the ranks' gradients: a micro-batch's weight is then ``world x its tokens / all
    ranks' tokens`` (``token_total``: the sum of every rank's count, a collective every rank calls each step), so
    a rank with fewer response tokens weighs less, as one process with the whole batch would weigh it."""
    counts = []
    for b in window:
        labels = b.get("labels") if isinstance(b, dict) else None
        if labels is None or labels.dim() != 2:
            return [None] * len(window)
        counts.append(int((labels[:, 1:] != -100).sum()))
    if world == 1 or token_total is None:
        total, world = (sum(counts) if len(window) > 1 else 0), 1
    else:
        total = int(token_total(sum(counts)))
    return [world * c / total for c in counts] if total else [None] * len(window)


def _backward_window(
    model, batches, device, grad_accum, step, skip_nonfinite, all_finite, times: dict[str, float], ranks=(1, None)
):
    """Forward and backward of one step's ``grad_accum`` micro-batches: ``(summed loss, tokens, all finite)``; the
    seconds of each are added to ``times`` (a layer-wise optimizer's steps are inside the backward's). ``ranks``:
    ``(world, token_total)`` of :func:`_token_shares`."""
    total_loss, step_tokens, finite = 0.0, 0, True
    window = [next(batches) for _ in range(grad_accum)]
    shares = _token_shares(window, *ranks)
    for share, batch in zip(shares, window):
        inputs = _model_inputs(batch, device)
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        times["forward_time"] += time.perf_counter() - t0
        here = bool(torch.isfinite(loss))
        if not (here if all_finite is None else all_finite(here)):
            if not skip_nonfinite:
                what = f"loss is {loss.item()}" if not here else "the loss is not finite on another rank"
                raise FloatingPointError(
                    f"{what} at step {step}; lower the learning rate, or pass --nonfinite skip to skip such steps"
                )
            finite = False  # the rest of the window is still drawn, so the data position stays the same
            continue
        t0 = time.perf_counter()
        if share is None:
            (loss / grad_accum if grad_accum > 1 else loss).backward()
        else:
            (loss * share).backward()
        times["backward_time"] += time.perf_counter() - t0
        total_loss += loss.item() if share is None else loss.item() * share * grad_accum  # divided by grad_accum
        mask = inputs.get("attention_mask")
        step_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    return total_loss, step_tokens, finite


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    steps: int,
    *,
    scheduler: Any = None,
    grad_clip: float | None = 1.0,
    callback: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 1,
    start_step: int = 0,
    grad_accum: int = 1,
    step_hook: Callable[[int], bool | None] | None = None,
    skip_nonfinite: bool = False,
    all_finite: Callable[[bool], bool] | None = None,
    world: int = 1,
    token_total: Callable[[int], int] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` optimizer steps on ``batches`` (e.g. a :class:`~gradspace.train.data.BatchStream`
    of ``(input_ids, labels)``, or a :class:`~gradspace.train.tasks.ExampleStream` of input dicts).

    Each step: forward with ``labels``, backward, optional gradient clipping, ``optimizer.step()``,
    ``scheduler.step()``. ``callback(record)`` gets the step record every ``log_every`` steps and at the last one.

    Returns ``{"history": [per-step dicts], "train_loss": mean of the last 10% of steps (at most 10), "wall_time":
    seconds, "tokens": count (not padding), "stopped_at": step or None}``. Evaluation is the caller's, from
    ``step_hook``. A non-finite loss raises
    ``FloatingPointError``, or with ``skip_nonfinite`` skips that optimizer step (counted in ``skipped_steps``).
    Under torchrun ``all_finite(ok)`` is true only when every rank's loss is finite (``Parallel.all_ok``): ranks
    decide together, so one rank's NaN never leaves the others waiting in the gradient all-reduce. ``world`` and
    ``token_total`` (``Parallel.total``) weigh token-mean losses by every rank's labelled tokens (``_token_shares``).

    Resuming: ``start_step`` is the number of steps already done (the model, optimizer, scheduler and batches
    restored by the caller); steps ``start_step + 1 .. steps`` run. ``grad_accum`` micro-batches are averaged per
    step. ``step_hook(step)`` runs after every completed step; returning True stops the run at that step
    boundary (``result["stopped_at"]`` is set).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step must be in [0, {steps}), got {start_step}")
    device = _device(model)
    model.train()
    history: list[dict[str, Any]] = []
    tokens = 0
    start = time.perf_counter()
    stopped_at = None
    skipped = 0
    for step in range(start_step + 1, steps + 1):
        t0 = time.perf_counter()
        times = {"forward_time": 0.0, "backward_time": 0.0}
        before = _optimizer_seconds(optimizer)
        total_loss, step_tokens, finite = _backward_window(
            model, batches, device, grad_accum, step, skip_nonfinite, all_finite, times, (world, token_total)
        )
        grad_norm = None
        if grad_clip and finite:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        if finite:
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        step_time = time.perf_counter() - t0
        tokens += step_tokens
        loss = total_loss / grad_accum if finite else float("nan")
        record = _record(step, loss, lr, grad_norm, step_time, step_tokens, times, before, optimizer)
        history.append(record)
        if callback is not None and (step % max(1, log_every) == 0 or step == steps):
            callback(record)
        if step_hook is not None and step_hook(step) and step != steps:
            stopped_at = step
            break
    return _result(history, skipped, time.perf_counter() - start, tokens, stopped_at)


def _record(step, loss, lr, grad_norm, step_time, step_tokens, times, before, optimizer) -> dict[str, Any]:
    """A step's record: its loss, rate, timings (``times``: forward and backward; the optimizer's since ``before``)."""
    spent = {k: v - before[k] for k, v in _optimizer_seconds(optimizer).items()}
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time": step_time,
            "tokens_per_s": step_tokens / step_time, **times, **spent}  # fmt: skip


def _optimizer_seconds(optimizer) -> dict[str, float]:
    """A gradspace optimizer's running totals: seconds stepping weights (projection, inner rule, write-back,
    subspace updates) and of those in subspace updates; nothing for another optimizer."""
    timing = getattr(optimizer, "seconds", None)
    return timing() if callable(timing) else {}


def _result(history, skipped: int, wall_time: float, tokens: int, stopped_at) -> dict[str, Any]:
    """``train``'s return: the train loss is the mean of the last 10% of steps (at most 10)."""
    tail = [r["loss"] for r in history[-max(1, min(10, len(history) // 10)) :] if math.isfinite(r["loss"])]
    return {
        "history": history,
        "train_loss": sum(tail) / len(tail) if tail else float("nan"),
        "skipped_steps": skipped,
        "wall_time": wall_time,
        "tokens": tokens,
        "tokens_per_s": tokens / wall_time,
        "stopped_at": stopped_at,
    }
