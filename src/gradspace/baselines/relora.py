"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates"): LoRA whose adapters are
merged into the weights every ``reset_every`` steps and started afresh, so that the sum of many rank-r updates
reaches a high rank. At each restart (the paper's three parts):

- merge: ``W += (alpha / r) B A``; then ``A`` is re-drawn Kaiming-uniform and ``B`` zeroed (the model's output is
  unchanged by a restart);
- partial optimizer reset: of each adapter's moments only the largest ``1 - prune`` by magnitude are kept
  (``prune`` 0.999, the paper's magnitude pruning);
- jagged schedule: the learning rate of the run's schedule times a ramp from 0 to 1 over ``restart_warmup``
  steps after each restart.

Written on peft's LoRA (no maintained package exists; the authors' Apache-2.0 code is unmaintained since 2024,
and its logic was read, not copied). A restart's random draw is seeded by (seed, step), so a resumed run draws the
same factors. Options: ``alpha``, ``dropout`` (as LoRA), ``reset_every`` (default: a quarter of the run),
``prune``, ``restart_warmup`` (default: a tenth of ``reset_every``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .lora import LoRA


class ReLoRA(LoRA):
    defaults = {**LoRA.defaults, "reset_every": None, "prune": 0.999, "restart_warmup": None}

    def __init__(self):
        super().__init__("relora")

    @staticmethod
    def periods(own: dict[str, Any], steps: int) -> tuple[int, int]:
        """``(reset_every, restart_warmup)`` of a run of ``steps``: the options, or their defaults."""
        for key in ("reset_every", "restart_warmup"):
            value = own[key]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"relora {key} must be an integer, got {value!r}")
        if not isinstance(own["prune"], (int, float)) or isinstance(own["prune"], bool):
            raise ValueError(f"relora prune must be a number in [0, 1), got {own['prune']!r}")
        every = int(own["reset_every"] or max(1, steps // 4))
        warm = int(own["restart_warmup"] if own["restart_warmup"] is not None else max(1, every // 10))
        if every < 1 or warm < 0 or not 0.0 <= float(own["prune"]) < 1.0:
            raise ValueError(
                f"relora: reset_every must be >= 1, restart_warmup >= 0 and prune in [0, 1), got {every}, {warm}, "
                f"{own['prune']}"
            )
        return every, warm

    def check(self, own: dict[str, Any], steps: int) -> None:
        self.periods(own, steps)

    def schedule(self, scheduler, own: dict[str, Any], steps: int):
        """The jagged schedule: each of the schedule's factors times the ramp after the last restart."""
        every, warm = self.periods(own, steps)

        def jag(step: int, fn) -> float:
            since = step - (step // every) * every
            ramp = 1.0 if step < every or warm == 0 else min(1.0, (since + 1) / warm)
            return fn(step) * ramp

        scheduler.lr_lambdas = [lambda s, fn=fn: jag(s, fn) for fn in scheduler.lr_lambdas]
        scheduler.base_lrs = list(scheduler.base_lrs)
        return scheduler

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer, step: int, own: dict[str, Any], steps: int, seed: int) -> None:
        every, _ = self.periods(own, steps)
        if step % every or step == steps:
            return
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        reset = []
        for layer in lora_layers(model):
            base = layer.get_base_layer()
            base.weight.add_(layer.get_delta_weight("default").to(base.weight.dtype))
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            fresh = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            a.copy_(fresh)
            b.zero_()
            reset += [a, b]
        prune_moments(optimizer, reset, float(own["prune"]))


def lora_layers(model: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def prune_moments(optimizer, params: list[torch.Tensor], ratio: float) -> None:
    """Keep the largest ``1 - ratio`` of each moment of ``params`` by magnitude (the others zeroed), through the
    inner rule's ``moments`` / ``set_moments``, so every rule's state is pruned alike."""
    from ..rules import get_rule

    for p in params:
        state = optimizer.state.get(p, {}).get("rule")  # the rule's part (gradspace.components)
        if not state:
            continue
        rule = get_rule(optimizer.group_of(p)["base"])
        moments = rule.moments(state)
        for key, m in moments.items():
            keep = max(0, math.ceil(m.numel() * (1.0 - ratio)))
            if keep == 0:
                moments[key] = torch.zeros_like(m)
                continue
            threshold = m.abs().reshape(-1).kthvalue(m.numel() - keep + 1).values
            moments[key] = torch.where(m.abs() >= threshold, m, torch.zeros_like(m))
        rule.set_moments(state, moments)
