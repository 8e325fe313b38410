"""The inner-rule seam: an ordinary optimizer run on a (projected or full) gradient tensor.

An inner rule knows nothing about bases. It is handed its own part of a parameter's state (``state["rule"]``, the
entries it declares in ``state_keys``: ``gradspace.components``), updates it from a gradient tensor, and returns
a direction ``D`` and a step factor ``f`` such that the weight moves by ``-lr * f * D`` (mapped back to the full
space first when the gradient was projected). The factor lets Adam keep its bias correction out of the tensor
math, exactly as galore-torch and Hugging Face's AdamW do.

Moment policies (``gradspace.moments``) read and write the rule's moments through ``moments``/``set_moments``,
which expose them as dense float32 tensors in the projected frame (``m`` first moment, ``v`` second moment).
"""

from __future__ import annotations

from typing import Any

import torch


class InnerRule:
    """Base class; subclasses are stateless singletons (all state lives in the ``state`` they are handed: the
    rule's own part of a parameter's state)."""

    name: str = ""
    #: group hyperparameters this rule reads, with their defaults (merged into the optimizer defaults)
    defaults: dict[str, Any] = {}
    #: the options that fix its state's layout: a checkpoint saved with other values is refused
    structural: tuple[str, ...] = ()
    #: every state entry it may write -> ``LIKE_GRAD`` (shaped like its gradient) or None; the shared ``step``
    #: counter is the optimizer's
    state_keys: dict[str, str | None] = {}
    #: whether the rule keeps a second moment that a moment policy may transform
    has_second_moment: bool = False
    #: every state entry depends on the same entry of the gradient alone, so the rule can run on the rows of a
    #: weight that one FSDP2 rank holds
    elementwise: bool = False

    def validate(self, group: dict) -> None:
        """Raise ValueError naming the bad hyperparameter."""

    def init_state(self, state: dict, like: torch.Tensor, group: dict) -> None:
        """Create the rule's state for gradients shaped like ``like``, in ``like``'s dtype unless the group sets
        ``state_dtype``."""
        raise NotImplementedError

    def update(self, grad: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def state_bytes(self, shape: tuple[int, ...], elem: int, group: dict) -> int:
        """Bytes of the state ``init_state`` makes for a gradient of ``shape``, with state elements of ``elem``
        bytes: the memory formula, which ``gradspace.bench memory`` checks against the state it counts."""
        raise NotImplementedError

    def update_many(
        self, grads: list[torch.Tensor], states: list[dict], group: dict
    ) -> tuple[list[torch.Tensor], list[float]]:
        """``update`` of each gradient with its state, as lists (the batched step, ``gradspace.batched``); rules
        override it with one ``torch._foreach_*`` pass over the list, with the same results."""
        out = [self.update(g, s, group) for g, s in zip(grads, states)]
        return [d for d, _ in out], [f for _, f in out]

    def step_full_rank(self, params: list[torch.Tensor], states: list[dict], group: dict) -> None:
        """Move full-rank (unprojected) weights by ``-lr * f * D``; rules with a fused multi-tensor kernel
        override this, since these weights (embeddings, head, norms) are half of a LLaMA's parameters."""
        lr = float(group["lr"])
        for p, state in zip(params, states):
            direction, factor = self.update(p.grad, state, group)
            p.add_(direction, alpha=-lr * factor)

    def moments(self, state: dict) -> dict[str, torch.Tensor]:
        """Dense float32 copies (or views) of the moments: ``{"m": ..., "v": ...}`` (``v`` optional)."""
        return {}

    def set_moments(self, state: dict, moments: dict[str, torch.Tensor]) -> None:
        """Store moments given in the layout of ``moments()``; shapes may change (adaptive rank)."""

    def reset(self, state: dict, like: torch.Tensor, group: dict) -> None:
        """Zero the moments and restart bias correction (moment policy ``reset``)."""
        state.clear()
        self.init_state(state, like, group)

    def template(self, rank: int, cols: int, p: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """A shape/dtype template for this rule's state on a projected gradient (no data is written): the dtype of
        the rule's existing floating-point state, else the parameter's."""
        dtype = p.dtype
        for k in self.state_keys:
            v = (state or {}).get(k)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                dtype = v.dtype
                break
        return torch.empty(rank, cols, dtype=dtype, device=p.device)

    def bias_corrections(self, state: dict, group: dict) -> tuple[float, float] | None:
        """``(1 - beta1^t, 1 - beta2^t)`` of a rule whose moments are bias-corrected averages (the ``project``
        moment policy needs them); None for the others, whose moments that policy rotates."""
        return None

    def state_dtype(self, group: dict, default: torch.dtype) -> torch.dtype:
        """Moments are kept in the parameter's dtype unless the group sets ``state_dtype`` (e.g. "float32")."""
        dtype = group.get("state_dtype")
        if dtype is None:
            return default
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_betas(group: dict, n: int = 2) -> None:
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) < n:
        raise ValueError(f"betas must be a tuple of {n} floats in [0, 1), got {betas!r}")
    for i, b in enumerate(betas[:n]):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")


def check_nonneg(group: dict, key: str) -> None:
    if float(group.get(key, 0.0)) < 0.0:
        raise ValueError(f"{key} must be >= 0, got {group[key]}")
