"""What users hand the optimizer, checked as torch.optim checks it (and where gradspace is stricter, said so):
hyperparameters before params, named parameters, param-group keys, and checkpoints saved with another setup."""

from __future__ import annotations

from typing import Any

import torch

#: param-group keys that torch, its LR schedulers, the Hugging Face Trainer and common training code add; accepted
#: as they are (any other key that is not a near-miss of a known one is accepted too, as torch does)
FOREIGN_GROUP_KEYS = {
    "initial_lr",
    "max_lr",
    "min_lr",
    "base_lr",
    "base_momentum",
    "max_momentum",
    "momentum_decay",
    "name",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "maximize",
    "amsgrad",
    "decoupled_weight_decay",
}
#: misspellings that difflib's similarity does not catch
GROUP_KEY_ALIASES = {
    "projection_type": "proj_type",
    "proj_gap": "update_proj_gap",
    "update_gap": "update_proj_gap",
    "galore_scale": "scale",
    "alpha_scale": "scale",
    "rule": "base",
    "inner_rule": "base",
}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, torch.Tensor) else value


def check_lr_and_decay(lr: Any, weight_decay: Any) -> None:
    """torch.optim's checks, before anything else is looked at."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    lr, weight_decay = _number(lr), _number(weight_decay)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: lr must be a number >= 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: weight_decay must be a number >= 0, got {weight_decay!r}")


def check_real(p: torch.Tensor, label: str) -> None:
    """Complex parameters would be trained on their real part in a subspace (and fail in the fused full-rank
    kernel): refuse them, projected or not."""
    if not p.is_floating_point():
        raise ValueError(
            f"{label} has dtype {p.dtype}; gradspace supports real floating-point parameters only: put it in a "
            "torch.optim optimizer of its own, or train a real view of it (torch.view_as_real)"
        )


def split_named(params: list) -> tuple[list, list[str] | None]:
    """``[(name, tensor), ...]`` (``model.named_parameters()``, as torch >= 2.6 accepts) into tensors and names."""
    named = [isinstance(x, tuple) for x in params]
    if not any(named):
        return params, None
    if not all(named) or not all(len(x) == 2 and isinstance(x[0], str) for x in params):
        raise ValueError(
            "all optimizer params should be with/without names. Some param names are missing: pass all tensors or "
            "all (name, tensor) pairs, as model.named_parameters() gives"
        )
    return [p for _, p in params], [n for n, _ in params]


def add_gradspace_state(opt, state_dict: dict[str, Any]) -> None:
    """The first state_dict post-hook: user hooks registered later see the whole dict, gradspace's part included."""
    state_dict["gradspace"] = {"skipped_steps": opt.skipped_steps, "seed": opt.seed, "state_format": STATE_FORMAT}


def check_same_configuration(index: int, group: dict, saved: dict, structural: tuple[str, ...]) -> None:
    """``structural``: the keys that fix the saved state's layout (``SubspaceOptimizer.structural_keys``)."""
    if ("rank" in group) != ("rank" in saved):
        kinds = ("projected", "full-rank") if "rank" in saved else ("full-rank", "projected")
        raise ValueError(
            f"optimizer checkpoint: param group {index} was saved {kinds[0]} but is {kinds[1]} here; build the "
            "optimizer with the same method and parameter selection as the run that saved it"
        )
    for key in structural:
        if key in saved and key in group and saved[key] != group[key]:
            raise ValueError(
                f"optimizer checkpoint was saved with {key}={saved[key]!r} in param group {index}, but this "
                f"optimizer has {key}={group[key]!r}; build it with the same method, inner rule and rank as the "
                "run that saved it (or start a new run)"
            )


def check_saved_state(p: torch.Tensor, st: dict, rule, keys: dict[str, Any]) -> None:
    """``keys``: every entry this parameter's components declare, nested by owner
    (``SubspaceOptimizer.state_keys``); an entry none of them declares was written by another rule or tracker."""
    foreign = sorted(_undeclared(st, keys))
    if foreign:
        raise ValueError(
            f"optimizer checkpoint state for a parameter of shape {tuple(p.shape)} has {', '.join(foreign)}, which "
            f"neither inner rule {rule.name!r} nor this group's tracker declares in its state_keys; it was saved "
            "with another rule, tracker or model"
        )
    basis = st.get("basis")
    if basis is not None:
        shape = st["basis_shape"].tolist() if "basis_shape" in st else basis.shape  # a packed 4-bit basis: its own
        if p.dim() != 2 or shape[0] not in p.shape:
            raise ValueError(
                f"optimizer checkpoint has a basis of shape {tuple(shape)} for a parameter of shape "
                f"{tuple(p.shape)}; it was saved for a different model"
            )
        return
    for key, like in keys.get(
        "rule", {}
    ).items():  # trained in full rank: the rule's gradient-shaped state has p's size
        value = st.get("rule", {}).get(key)
        if like is not None and isinstance(value, torch.Tensor) and value.numel() != p.numel():
            raise ValueError(
                f"optimizer checkpoint has rule.{key} of {value.numel()} elements for a parameter of shape "
                f"{tuple(p.shape)}; it was saved for a different model"
            )


def _undeclared(st: dict, keys: dict[str, Any], prefix: str = ""):
    for key, value in st.items():
        if key not in keys:
            yield f"{prefix}{key}"
        elif isinstance(value, dict):
            yield from _undeclared(value, keys[key] if isinstance(keys[key], dict) else {}, f"{prefix}{key}.")


#: the layout of a parameter's optimizer state: 2 = nested by owner (``gradspace.components.PARTS``)
STATE_FORMAT = 2


def check_state_format(extra: dict, state: dict) -> None:
    """Refuse an optimizer state dict in another layout with an error that says what to do (format 1 kept
    every component's entries side by side in one flat dict)."""
    found = extra.get("state_format", 1)
    if state and found != STATE_FORMAT:
        raise ValueError(
            f"optimizer state format {found} (a flat state dict, written by an earlier gradspace) cannot be loaded "
            f"by this version, which reads format {STATE_FORMAT} (each component's state nested under its owner); "
            "resume it with the gradspace version that wrote it, or start a new run"
        )
