"""Low-rank (GaLore's Table 2 row): each adapted weight replaced by a trained factorisation ``W = (alpha / r) B A``
from scratch, with no full-rank weight at all (ReLoRA's code, ``lora_only``: both factors Kaiming-uniform).

Option ``alpha`` (default: the rank, so the factors' product has scale 1). The exported model holds the product as
an ordinary weight, so any tool loads it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..params import is_conv1d
from .base import Baseline, adapted_modules


class Factorised(nn.Module):
    """``y = scale * B (A x) + bias``: A is r x in, B is out x r."""

    def __init__(self, linear: nn.Module, rank: int, scale: float):
        super().__init__()
        weight = linear.weight.t() if is_conv1d(linear) else linear.weight  # Conv1D stores (in, out)
        out_features, in_features = weight.shape
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lowrank_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lowrank_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lowrank_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lowrank_B, a=math.sqrt(5))
        self.bias = linear.bias
        self.scale = scale
        self.conv1d = is_conv1d(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(nn.functional.linear(x, self.lowrank_A), self.lowrank_B) * self.scale
        return y if self.bias is None else y + self.bias

    def product(self) -> torch.Tensor:
        """The weight this factorisation stands for, in its module's own layout."""
        w = (self.lowrank_B @ self.lowrank_A) * self.scale
        return w.t() if self.conv1d else w


class LowRank(Baseline):
    name = "lowrank"
    defaults = {"alpha": None}
    uses_rank = True
    pretraining_only = True

    def prepare(self, model: nn.Module, own: dict[str, Any], rank: int | None, targets, pretraining: bool):
        rank = int(rank)
        scale = (float(own["alpha"]) if own["alpha"] is not None else rank) / rank
        for name in adapted_modules(model, targets):
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, Factorised(getattr(owner, leaf), rank, scale))
        return model

    @torch.no_grad()
    def merged(self, model: nn.Module) -> nn.Module:
        """Each factorisation back to the module it replaced, holding the product (in place: the run's last use)."""
        from transformers.pytorch_utils import Conv1D

        for name, module in list(model.named_modules()):
            if not isinstance(module, Factorised):
                continue
            w = module.product()
            if module.conv1d:
                plain = Conv1D(w.shape[1], w.shape[0]).to(w)
            else:
                plain = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None).to(w)
            plain.weight.copy_(w)
            if module.bias is not None:
                plain.bias = module.bias
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, plain)
        return model
