"""Online Subspace Descent: P takes one optimizer step on an online-PCA loss every step (docs/methods.md).

    L(P) = ||P P^T Gn - Gn||_F^2 + lambda ||P^T P - I||_F^2,    Gn = G / ||G||_F

The gradient is taken in closed form in O(k l r) (two products with the gradient), so a step costs a small
fraction of an SVD and needs no autograd inside the optimizer step.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .base import Context, Tracker
from .svd import SVD_DEFAULTS, svd_basis, validate_svd

P_OPTIMIZERS = ("adam", "sgd")
P_LR_MODES = ("alpha", "code")
#: Adam's constants for P: torch.optim.Adam(W)'s defaults, which the authors' code used
P_BETAS = (0.9, 0.999)
P_EPS = 1e-8
_TINY = 1e-30


def pca_grad(p: torch.Tensor, gn: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dP, P^T P - I)``.

    With ``E = P P^T Gn - Gn``, ``dL/dP = 2 (E Gn^T P + Gn E^T P) + 4 lambda P (P^T P - I)``. Writing
    ``B = Gn^T P``, ``W = Gn B`` and ``D = P^T P - I`` this is ``2 (P (B^T B + 2 lambda D) + W (D - I))``:
    the k x l error E is never formed, and ``Gn`` enters only through ``B`` and ``W`` (the 1/||G|| factors are
    applied to those small matrices instead of copying G).
    """
    g = gn.to(p.dtype)
    inv2 = 1.0 / torch.linalg.vector_norm(g).square().clamp_min(_TINY)
    b = g.mT @ p  # l x r, times 1/||G|| for Gn
    w = (g @ b) * inv2  # k x r, exact W
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    d = p.mT @ p - eye
    inner = (b.mT @ b) * inv2 + (2.0 * lam) * d
    return 2.0 * (p @ inner + w @ (d - eye)), d


class OnlinePCATracker(Tracker):
    """``online_pca``: SVD once, then P moves every step, after the weight, with the same gradient.

    Learning rate of P: ``alpha * lr`` (``p_lr_mode="alpha"``, the paper) or, as the authors' code,
    ``p_lr * lr / initial_lr`` with ``p_lr`` defaulting to ``1 / update_proj_gap`` (``p_lr_mode="code"``;
    ``initial_lr`` is what torch LR schedulers store in the group, so the ratio is the schedule's factor).
    ``p_weight_decay`` is AdamW-style decoupled decay of P; by default W's ``weight_decay``, as the paper ties
    them (the authors' code: 0.01 with ``osd_lambda=0``).

    No P step is taken on the step that initialised P (as in the authors' code): the online-PCA loss is exactly
    stationary at the SVD start, so its gradient there is float rounding, which Adam would normalise into full
    ``alpha * lr`` moves of every entry of P, throwing the SVD away and making the run chaotically sensitive to
    the last bit of the gradient.
    """

    name = "online_pca"
    moves_every_step = True
    periodic = False
    orthonormal = False  # plain gradient steps on P: only nearly orthonormal
    defaults: ClassVar[dict[str, Any]] = {
        "alpha": 5.0,
        "osd_lambda": 0.1,
        "p_optimizer": "adam",
        "p_lr_mode": "alpha",
        "p_lr": None,
        "p_weight_decay": None,  # None: W's weight_decay (the paper ties them)
        **SVD_DEFAULTS,  # the first P
    }
    structural = ("p_optimizer", "p_lr_mode")
    state_keys: ClassVar[dict[str, str | None]] = dict.fromkeys(("trk_p_m", "trk_p_v", "trk_p_step", "trk_diag_orth"))
    diagnostics = ("trk_diag_orth",)

    def _get(self, group: dict, key: str):
        return group.get(key, self.defaults[key])

    def state_bytes(self, k, l, rank, group, clock=(1, 0)) -> int:
        """P (the basis), Adam's two moments of P, and the scalar ||P^T P - I|| of the diagnostics."""
        adam = self._get(group, "p_optimizer") == "adam"
        return 4 * k * rank * (3 if adam else 1) + 4

    def validate(self, group: dict) -> None:
        def number(key, ok, what):
            value = self._get(group, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"{key} must be {what}, got {value!r}")

        number("alpha", lambda x: 0.0 < x < math.inf, "a positive finite number")
        number("osd_lambda", lambda x: 0.0 <= x < math.inf, "a finite number >= 0")
        if self._get(group, "p_weight_decay") is not None:
            number("p_weight_decay", lambda x: 0.0 <= x < math.inf, "None (W's weight_decay) or a finite number >= 0")
        if self._get(group, "p_lr") is not None:
            number("p_lr", lambda x: 0.0 < x < math.inf, "None or a positive finite number")
        validate_svd(group)
        for key, choices in (("p_optimizer", P_OPTIMIZERS), ("p_lr_mode", P_LR_MODES)):
            if self._get(group, key) not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}, got {self._get(group, key)!r}")

    def init(self, gn, rank, state, group, ctx: Context):
        p = svd_basis(gn, rank, group, ctx)
        if self._get(group, "p_optimizer") == "adam":
            state["trk_p_m"] = torch.zeros_like(p)
            state["trk_p_v"] = torch.zeros_like(p)
        state["trk_p_step"] = 0
        return p

    def due(self, gn, state, group) -> bool:
        return False  # P moves in after_step, every step

    def update(self, gn, state, group, ctx: Context):
        return state.basis

    def p_lr(self, group: dict) -> float:
        lr = float(group["lr"])
        if self._get(group, "p_lr_mode") == "alpha":
            return float(self._get(group, "alpha")) * lr
        base = self._get(group, "p_lr")
        base = 1.0 / group["update_proj_gap"] if base is None else float(base)
        initial = float(group.get("initial_lr", lr))
        return base * (lr / initial if initial > 0.0 else 1.0)

    def p_weight_decay(self, group: dict) -> float:
        wd = self._get(group, "p_weight_decay")
        return float(group.get("weight_decay", 0.0) if wd is None else wd)

    def after_step(self, gn, state, group, ctx: Context) -> None:
        p = state.basis
        if state.step == 0:  # the step that initialised P by SVD: no P step (class docstring)
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            state["trk_diag_orth"] = torch.linalg.matrix_norm(p.mT @ p - eye)
            return
        grad, d = pca_grad(p, gn, float(self._get(group, "osd_lambda")))
        state["trk_diag_orth"] = torch.linalg.matrix_norm(d)  # of the P this step projected with
        lr = self.p_lr(group)
        wd = self.p_weight_decay(group)
        state["trk_p_step"] += 1
        if wd > 0.0:
            p.mul_(1.0 - lr * wd)
        if self._get(group, "p_optimizer") == "adam":
            beta1, beta2 = P_BETAS
            t = state["trk_p_step"]
            if "trk_p_m" not in state:  # p_optimizer changed on a resumed run
                state["trk_p_m"], state["trk_p_v"] = torch.zeros_like(p), torch.zeros_like(p)
            m, v = state["trk_p_m"], state["trk_p_v"]
            m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(P_EPS)
            p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**t))
        else:
            p.add_(grad, alpha=-lr)
