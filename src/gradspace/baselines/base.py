"""What a baseline is (see ``gradspace.baselines``), and the helpers its files share."""

from __future__ import annotations

from typing import Any

from torch import nn


class Baseline:
    """What every baseline answers; the base class trains every trainable parameter in full rank."""

    name = ""
    #: its own options -> defaults; everything else in optim_args is the inner rule's
    defaults: dict[str, Any] = {}
    #: other names of its options (the package's own spelling, e.g. peft's ``lora_alpha``) -> the option
    aliases: dict[str, str] = {}
    #: whether ``--rank`` is the baseline's own (the adapters' or factors' rank)
    uses_rank = False
    #: the inner rule it needs, if any (``adamw8bit``); the run's ``--base`` otherwise
    base: str | None = None
    #: it trains a model from scratch (the factorised model): refused by ``finetune``
    pretraining_only = False

    def options(self, optim_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(own options with defaults filled in, the inner rule's options)``."""
        for alias, key in self.aliases.items():
            if alias in optim_args:
                if key in optim_args:
                    raise ValueError(f"{self.name}: give {key} or {alias}, not both (they are one option)")
                optim_args = {(key if k == alias else k): v for k, v in optim_args.items()}
        own = {**self.defaults, **{k: v for k, v in optim_args.items() if k in self.defaults}}
        return own, {k: v for k, v in optim_args.items() if k not in self.defaults}

    def check(self, own: dict[str, Any], steps: int) -> None:
        """Raise ValueError naming a bad option of its own (called before anything is built)."""

    def prepare(self, model: nn.Module, own: dict[str, Any], rank: int | None, targets, pretraining: bool):
        return model

    def optimizer(self, model: nn.Module, lr: float, base: str, rule: dict, own: dict, pretraining: bool, **kw):
        """The optimizer of the trainable parameters; ``kw``: ``weight_decay``, ``nonfinite``, ``weight_rounding``."""
        from ..methods import create_optimizer

        return create_optimizer("adamw", model, lr, base=self.base or base, **rule, **kw)

    def trainable(self, model: nn.Module, optimizer) -> int:
        """How many parameters the run trains (the summary's ``trainable_params``)."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def schedule(self, scheduler, own: dict[str, Any], steps: int):
        return scheduler

    def after_step(self, model: nn.Module, optimizer, step: int, own: dict[str, Any], steps: int, seed: int) -> None:
        """Called once step ``step`` of ``steps`` is applied, before that step's checkpoint."""

    def merged(self, model: nn.Module) -> nn.Module:
        """The model to export as a plain Hugging Face model."""
        return model

    def adapter(self, model: nn.Module):
        """The peft model whose adapter folder is exported beside the merged model, or None."""
        return None


def adapted_modules(model: nn.Module, targets) -> list[str]:
    """The names of the linear modules a baseline adapts or factorises: the weights a subspace method would project
    with the same ``target_modules`` (``gradspace.params.select_params``), so the two are compared on the same
    weights."""
    from ..params import DEFAULT_TARGETS, select_params

    groups = select_params(model, targets or DEFAULT_TARGETS)
    return [n.removesuffix(".weight") for g in groups if "rank" in g for n in g["param_names"]]


def peft_targets(model: nn.Module, names: list[str]) -> list[str]:
    """peft's ``target_modules`` for exactly these modules: their short names (``q_proj``, ``v_proj``) when every
    linear module of those names is among them, as a peft user would write it; else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    same = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in short and hasattr(m, "weight")]
    return short if sorted(same) == sorted(names) else sorted(names)
