"""SGD with momentum, with ``torch.optim.SGD``'s semantics (weight decay aside: gradspace's is decoupled).

``b <- g`` on the first step (no dampening), then ``b <- momentum b + (1 - dampening) g``; the direction is ``b``,
or ``g + momentum b`` with Nesterov. With ``momentum = 0`` there is no state at all and the direction is ``g``.
"""

from __future__ import annotations

import math

import torch

from ..components import LIKE_GRAD
from .base import InnerRule, check_nonneg


class SGD(InnerRule):
    name = "sgd"
    defaults = {"momentum": 0.9, "dampening": 0.0, "nesterov": False}
    state_keys = {"sgd_buf": LIKE_GRAD, "sgd_step": None}
    elementwise = True

    def state_bytes(self, shape, elem, group) -> int:
        return math.prod(shape) * elem if group["momentum"] != 0 else 0

    def validate(self, group: dict) -> None:
        check_nonneg(group, "momentum")
        check_nonneg(group, "dampening")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov needs momentum > 0 and dampening 0, got momentum={group['momentum']}, "
                f"dampening={group['dampening']}"
            )

    def init_state(self, state: dict, like: torch.Tensor, group: dict) -> None:
        if group["momentum"] == 0:
            return
        dtype = self.state_dtype(group, like.dtype)
        state["sgd_buf"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        state["sgd_step"] = 0  # 0: the next step copies the gradient into the buffer, as torch does

    def update(self, grad: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        momentum = group["momentum"]
        buf = state.get("sgd_buf")
        if momentum == 0 or buf is None:
            return grad, 1.0
        if state["sgd_step"] == 0:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1.0 - group["dampening"])
        state["sgd_step"] += 1
        if group["nesterov"]:
            return grad.add(buf, alpha=momentum), 1.0
        return buf, 1.0

    def moments(self, state: dict) -> dict[str, torch.Tensor]:
        return {"m": state["sgd_buf"].float()} if "sgd_buf" in state else {}

    def set_moments(self, state: dict, moments: dict[str, torch.Tensor]) -> None:
        state["sgd_buf"] = moments["m"].to(state["sgd_buf"].dtype).contiguous()
