"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

``D = sign(beta1 m + (1 - beta1) g)``, then ``m <- beta2 m + (1 - beta2) g``: one moment, every entry of the
update is +-1 (so Lion wants a 3-10x smaller lr and larger weight decay than AdamW), no bias correction.
"""

from __future__ import annotations

import math

import torch

from ..components import LIKE_GRAD
from .base import InnerRule, check_betas


class Lion(InnerRule):
    name = "lion"
    defaults = {"betas": (0.9, 0.99)}
    state_keys = {"lion_m": LIKE_GRAD}

    def validate(self, group: dict) -> None:
        check_betas(group)

    elementwise = True

    def state_bytes(self, shape, elem, group) -> int:
        return math.prod(shape) * elem

    def init_state(self, state: dict, like: torch.Tensor, group: dict) -> None:
        dtype = self.state_dtype(group, like.dtype)
        state["lion_m"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)

    def update(self, grad: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        beta1, beta2 = group["betas"]
        m = state["lion_m"]
        direction = m.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
        m.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return direction, 1.0

    def moments(self, state: dict) -> dict[str, torch.Tensor]:
        return {"m": state["lion_m"].float()}

    def set_moments(self, state: dict, moments: dict[str, torch.Tensor]) -> None:
        state["lion_m"] = moments["m"].to(state["lion_m"].dtype).contiguous()
