"""AdamW, in the form galore-torch and Hugging Face's ``transformers.AdamW`` use.

``D = m / (sqrt(v) + eps)`` with step factor ``sqrt(1 - beta2^t) / (1 - beta1^t)``: eps is added to the raw
(not bias-corrected) ``sqrt(v)``. This is what GaLore was published with, so gradspace's GaLore reproduces the
reference trajectory; it differs from ``torch.optim.AdamW`` only by where eps enters.
"""

from __future__ import annotations

import math

import torch

from ..components import LIKE_GRAD
from .base import InnerRule, check_betas, check_nonneg


class AdamW(InnerRule):
    name = "adamw"
    defaults = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}
    has_second_moment = True
    elementwise = True
    state_keys = {"exp_avg": LIKE_GRAD, "exp_avg_sq": LIKE_GRAD, "exp_step": None}

    def state_bytes(self, shape, elem, group) -> int:
        return 2 * math.prod(shape) * elem

    def validate(self, group: dict) -> None:
        check_betas(group)
        check_nonneg(group, "eps")

    def init_state(self, state: dict, like: torch.Tensor, group: dict) -> None:
        dtype = self.state_dtype(group, like.dtype)
        state["exp_avg"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        state["exp_step"] = 0

    def update(self, grad: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["exp_step"] += 1
        t = state["exp_step"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        factor = 1.0
        if group["correct_bias"]:
            factor = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        return torch.div(exp_avg, denom, out=denom), factor  # reuse denom's buffer: no second temporary

    def update_many(self, grads, states, group):
        """``update`` over a list with ``torch._foreach_*`` (a handful of multi-tensor ops for the whole list):
        the same arithmetic, op for op, as ``update`` on each."""
        beta1, beta2 = group["betas"]
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_add_(denoms, group["eps"])
        factors = []
        for s in states:
            s["exp_step"] += 1
            t = s["exp_step"]
            factors.append(math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if group["correct_bias"] else 1.0)
        return torch._foreach_div(ms, denoms), factors

    def step_full_rank(self, params: list[torch.Tensor], states: list[dict], group: dict) -> None:
        """PyTorch's fused Adam kernel (one pass over p, g, m, v instead of about ten), set up to compute this
        rule's form: torch divides sqrt(v) by sqrt(bc2) before adding eps, so eps is passed as eps / sqrt(bc2)
        and the step size as lr * f * bc1 / sqrt(bc2). Weights it cannot take go through the plain loop."""
        fused = getattr(torch, "_fused_adam_", None)
        buckets: dict[tuple, list[int]] = {}
        loop: list[int] = []
        for i, (p, state) in enumerate(zip(params, states)):
            ok = fused is not None and p.grad.dtype == p.dtype == state["exp_avg"].dtype and p.is_contiguous()
            ok = ok and type(p) in (torch.Tensor, torch.nn.Parameter)  # an int8 weight steps on its float32 copy
            key = (p.device, p.dtype, state["exp_step"])
            (buckets.setdefault(key, []) if ok else loop).append(i)
        super().step_full_rank([params[i] for i in loop], [states[i] for i in loop], group)
        beta1, beta2 = group["betas"]
        for (device, _, done), index in buckets.items():
            t = done + 1
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
            factor = math.sqrt(bc2) / bc1 if group["correct_bias"] else 1.0
            fused(
                [params[i] for i in index],
                [params[i].grad for i in index],
                [states[i]["exp_avg"] for i in index],
                [states[i]["exp_avg_sq"] for i in index],
                [],
                [torch.tensor(float(t), device=device)] * len(index),  # read, not counted, by the kernel
                lr=float(group["lr"]) * factor * bc1 / math.sqrt(bc2),
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=float(group["eps"]) / math.sqrt(bc2),
                amsgrad=False,
                maximize=False,
            )
            for i in index:
                states[i]["exp_step"] = t

    def moments(self, state: dict) -> dict[str, torch.Tensor]:
        return {"m": state["exp_avg"].float(), "v": state["exp_avg_sq"].float()}

    def set_moments(self, state: dict, moments: dict[str, torch.Tensor]) -> None:
        dtype = state["exp_avg"].dtype
        state["exp_avg"] = moments["m"].to(dtype).contiguous()
        state["exp_avg_sq"] = moments["v"].to(dtype).contiguous()

    def bias_corrections(self, state: dict, group: dict) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        t = state["exp_step"]
        return 1.0 - beta1**t, 1.0 - beta2**t
