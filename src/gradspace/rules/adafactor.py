"""Adafactor (Shazeer & Stern 2018), with ``torch.optim.Adafactor``'s math and an absolute step size.

The second moment of a matrix (the last two dims of a >= 2-D tensor) is kept factored as a row mean ``R`` and a column
mean ``C`` of ``g^2``, so an r x l projected gradient costs r + l numbers; 1-D tensors keep a full ``V``. With
``beta2_t = 1 - t^beta2_decay`` (so no bias correction is needed):

    V_hat = R C / max(mean(R), eps1);   U = g / sqrt(max(V_hat, eps1^2));   D = U / max(1, RMS(U) / clip_threshold)

Deliberate difference from ``torch.optim.Adafactor``: torch moves the weight by
``max(eps2, RMS(W)) * min(lr, 1/sqrt(t))`` (relative step with parameter scaling). An inner rule never sees the
weight (in a subspace there is no projected weight to take the RMS of), so here the step is ``lr`` itself, as in
Hugging Face's Adafactor with ``relative_step=False, scale_parameter=False`` (what GaLore-Adafactor runs). Pass
lr = that product to get torch's trajectory (the tests do). ``eps1=None`` means the machine epsilon of the
gradient's dtype (torch uses the parameter's: the same for full-rank parameters; projected gradients are float32).

``beta1`` (default None, as in torch) adds Hugging Face's first moment, an EMA of the clipped update ``D``.
Without it ``moments()`` is empty, so moment policies other than ``keep`` reset the state at a basis change.
There is no ``bias_corrections``: the second moment is already unbiased and ``m`` is not a gradient average, so
the ``project`` policy rotates.
"""

from __future__ import annotations

import math

import torch

from ..components import LIKE_GRAD
from .base import InnerRule


class Adafactor(InnerRule):
    name = "adafactor"
    defaults = {"beta2_decay": -0.8, "eps1": None, "clip_threshold": 1.0, "beta1": None}
    has_second_moment = True
    #: the factored rows and columns are not shaped like the gradient; V (1-D tensors) and m are
    state_keys = {"fac_row": None, "fac_col": None, "fac_v": LIKE_GRAD, "fac_m": LIKE_GRAD, "fac_step": None}

    def state_bytes(self, shape, elem, group) -> int:
        """Row and column means of a matrix (a full V for 1-D), plus the optional first moment."""
        numel = math.prod(shape)
        v = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else numel
        return (v + (numel if group["beta1"] is not None else 0)) * elem

    def validate(self, group: dict) -> None:
        if not float(group["beta2_decay"]) <= 0.0:
            raise ValueError(f"beta2_decay must be <= 0, got {group['beta2_decay']}")
        if group["eps1"] is not None and not float(group["eps1"]) >= 0.0:
            raise ValueError(f"eps1 must be None or >= 0, got {group['eps1']}")
        if not float(group["clip_threshold"]) >= 1.0:
            raise ValueError(f"clip_threshold must be >= 1, got {group['clip_threshold']}")
        if group["beta1"] is not None and not 0.0 <= float(group["beta1"]) < 1.0:
            raise ValueError(f"beta1 must be None or in [0, 1), got {group['beta1']}")

    def init_state(self, state: dict, like: torch.Tensor, group: dict) -> None:
        dtype = self.state_dtype(group, like.dtype)
        if like.dim() >= 2:
            state["fac_row"] = like.new_zeros((*like.shape[:-1], 1), dtype=dtype)
            state["fac_col"] = like.new_zeros((*like.shape[:-2], 1, like.shape[-1]), dtype=dtype)
        else:
            state["fac_v"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        if group["beta1"] is not None:
            state["fac_m"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        state["fac_step"] = 0

    def update(self, grad: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        state["fac_step"] += 1
        weight = state["fac_step"] ** group["beta2_decay"]  # 1 - beta2_t
        eps1 = group["eps1"]
        if eps1 is None:
            eps1 = torch.finfo(grad.dtype).eps
        if "fac_row" in state:
            row, col = state["fac_row"], state["fac_col"]
            row.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)).to(row.dtype), weight)
            col.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)).to(col.dtype), weight)
            v_hat = row.float() @ col.float()
            v_hat.div_(row.float().mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            v = state["fac_v"]
            v.lerp_((grad * grad).to(v.dtype), weight)
            v_hat = v.to(torch.float32, copy=True)
        update = v_hat.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        denom = max(1.0, update.norm(2).item() / (math.sqrt(update.numel()) * group["clip_threshold"]))
        if "fac_m" not in state:
            return update, 1.0 / denom
        m = state["fac_m"]
        m.mul_(group["beta1"]).add_(update, alpha=(1.0 - group["beta1"]) / denom)
        return m, 1.0

    def moments(self, state: dict) -> dict[str, torch.Tensor]:
        if "fac_m" not in state:
            return {}
        if "fac_v" in state:
            v = state["fac_v"].float()
        else:
            row, col = state["fac_row"].float(), state["fac_col"].float()
            v = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny))
        return {"m": state["fac_m"].float(), "v": v}

    def set_moments(self, state: dict, moments: dict[str, torch.Tensor]) -> None:
        """Refactor V by its row and column means: exact when V is rank one (as a factored V_hat is), otherwise the
        rank-one fit Adafactor itself uses (it minimises the generalised KL divergence to V)."""
        dtype = state["fac_m"].dtype
        state["fac_m"] = moments["m"].to(dtype).contiguous()
        v = moments["v"].float()
        if "fac_v" in state:
            state["fac_v"] = v.to(dtype).contiguous()
        else:
            state["fac_row"] = v.mean(dim=-1, keepdim=True).to(dtype)
            state["fac_col"] = v.mean(dim=-2, keepdim=True).to(dtype)
