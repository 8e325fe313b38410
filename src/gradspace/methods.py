"""Named presets: each method is a tracker, a moment policy, an output rule (with recovery on or off), and defaults.

opt = create_optimizer("galore", model, lr=1e-3, rank=128, update_proj_gap=200, scale=0.25)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .optimizer import SubspaceOptimizer
from .params import DEFAULT_TARGETS, as_groups, select_params

#: preset name -> SubspaceOptimizer keyword defaults (None: no projection at all)
METHODS: dict[str, dict[str, Any] | None] = {
    "adamw": None,  # full rank, for comparison
    "galore": {"tracker": "svd", "moments": "keep"},
    # Fira (fira==1.0.2): GaLore plus recovery scaling of the dropped residual (docs/methods.md)
    "fira": {"tracker": "svd", "moments": "keep", "recovery": True},
    "subtrack": {"tracker": "subtrack", "moments": "keep"},
    "subtrack++": {"tracker": "subtrack", "moments": "project", "recovery": True},
    "osd": {"tracker": "online_pca", "moments": "keep"},
    # the Online Subspace Descent authors' released variant: P lr = 1/T on the schedule, no lambda, wd 0.01 on P
    "osd-code": {
        "tracker": "online_pca",
        "moments": "keep",
        "p_lr_mode": "code",
        "osd_lambda": 0.0,
        "p_weight_decay": 0.01,
    },
    "adarank": {"tracker": "adarank", "moments": "rotate"},
    # reconstructed from the abstract and reviews (docs/methods.md): random moves need both of these
    "grasswalk": {"tracker": "grasswalk", "moments": "project", "recovery": True},
    "grassjump": {"tracker": "grassjump", "moments": "project", "recovery": True},
    # Q-GaLore (q-galore-torch 1.0): GaLore with 4-bit projections and lazy, per-layer subspace updates; the paper's
    # INT8 weights and 8-bit Adam are the run's --dtype int8 and --base adamw8bit (docs/methods.md)
    "q-galore": {"tracker": "lazy-svd", "moments": "keep", "basis_dtype": "int4"},
    # APOLLO (arXiv:2412.05270, apollo-torch 1.0.3): a Gaussian projection only shapes the moments; the update is
    # the raw gradient scaled per channel. ``scale`` multiplies by sqrt(scale), as in apollo-torch.
    "apollo": {"tracker": "gaussian", "moments": "keep", "output": "scale", "scale_type": "channel", "scale": 1.0},
    # APOLLO-Mini: rank 1 and one factor per weight: two 1 x l moments, SGD-level memory
    "apollo-mini": {
        "tracker": "gaussian",
        "moments": "keep",
        "output": "scale",
        "scale_type": "tensor",
        "scale": 128.0,
        "rank": 1,
    },
}

PROJECTION_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def register_method(name: str, preset: dict[str, Any] | None, *, replace: bool = False) -> None:
    """Make ``create_optimizer(name, ...)`` build ``preset``: ``SubspaceOptimizer`` keywords (``tracker``,
    ``moments``, ``recovery``, the tracker's and output's options) plus the projection keys ``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``; None trains in full rank. The preset is checked here by
    building an optimizer with it on one (meta) weight, so a misspelt or misplaced option, an unknown tracker or
    an impossible combination is an error now. ``base`` is not part of a preset: every method runs every rule."""
    key = name.lower() if isinstance(name, str) else name
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if key in METHODS and not replace:
        raise ValueError(f"method {key!r} is already registered; pick another name or pass replace=True")
    if preset is not None:
        if not isinstance(preset, dict):
            raise TypeError(f"method {key!r}: the preset must be a dict of keywords or None, got {preset!r}")
        if "base" in preset:
            raise ValueError(f"method {key!r}: leave 'base' out of the preset (create_optimizer's base= picks it)")
        rank = preset.get("rank", 1)
        weight = nn.Parameter(torch.empty(rank + 1, rank + 1, device="meta"))
        group = {"params": [weight], "rank": rank, **{k: preset[k] for k in PROJECTION_KEYS[1:] if k in preset}}
        SubspaceOptimizer([group], **{k: v for k, v in preset.items() if k not in PROJECTION_KEYS})
        preset = dict(preset)
    METHODS[key] = preset


def unregister_method(name: str) -> None:
    if name.lower() not in METHODS:
        raise ValueError(f"no method {name!r} is registered")
    del METHODS[name.lower()]


def preset_projection(name: str) -> dict[str, Any]:
    """The projection settings a preset fixes itself (APOLLO-Mini's rank 1 and scale 128), which take the place of
    the caller's defaults but not of values the user gives."""
    return {k: v for k, v in (METHODS.get(name.lower()) or {}).items() if k in PROJECTION_KEYS}


def create_optimizer(
    name: str,
    model_or_groups: nn.Module | Iterable,
    lr: float = 1e-3,
    *,
    rank: int | None = None,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    proj_type: str | None = None,
    target_modules: str | re.Pattern | Sequence = DEFAULT_TARGETS,
    base: str = "adamw",
    memory_budget: int | str | dict[str, int] | None = None,
    **kwargs: Any,
) -> SubspaceOptimizer:
    """One-line entry point: a preset applied to a model (weights chosen by ``target_modules``) or to param groups.

    With a model, the selected 2-D linear weights are projected and everything else runs ``base`` in full rank.
    With param groups, groups carrying ``rank`` are projected (Hugging Face Trainer / galore-torch style); the
    keyword ``rank``/``update_proj_gap``/``scale``/``proj_type`` fill what those groups leave out.

    ``memory_budget`` (bytes, or ``"2GiB"``; with a model only) bounds the optimizer state instead of one rank:
    each projected weight gets its own rank, where its gradient's energy is (``gradspace.ranks``: measured on the
    gradients the weights hold after a backward, else by a stated prior), and ``rank`` is the most any weight gets
    (default d/4 of each weight). A dict ``{weight name: rank}`` gives an allocation made earlier (a resumed run's).
    """
    if isinstance(name, nn.Module) or not isinstance(name, str):
        raise TypeError(
            "create_optimizer(name, model, ...): the method name comes first, e.g. create_optimizer('galore', model) "
            f"(got a {type(name).__name__} as the name; pytorch-optimizer's order is the other way round)"
        )
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    preset = METHODS[key]
    given = {k: v for k, v in zip(PROJECTION_KEYS, (rank, update_proj_gap, scale, proj_type)) if v is not None}
    if preset is None:
        if given:
            raise ValueError(f"method {name!r} trains in full rank; {', '.join(given)} do(es) not apply to it")
        return SubspaceOptimizer(as_groups(model_or_groups), lr=lr, base=base, **kwargs)
    options = {**{k: v for k, v in preset.items() if k not in PROJECTION_KEYS}, **kwargs}
    given = {**preset_projection(key), **given}
    if memory_budget is not None and not isinstance(model_or_groups, nn.Module):
        raise ValueError("memory_budget needs the model itself (create_optimizer(name, model, memory_budget=...))")
    if isinstance(model_or_groups, nn.Module):
        groups = select_params(model_or_groups, target_modules, **{"rank": 128, **given})
        if memory_budget is not None:
            from .ranks import budget_groups
            from .sizes import parse_bytes

            budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
            groups = budget_groups(groups, budget, preset, base, {**options, "max_rank": rank})
    else:
        groups = as_groups(model_or_groups)
        if not any("rank" in g for g in groups):
            raise ValueError(
                f"method {name!r} needs at least one param group with a 'rank' key, or pass the model itself"
            )
        for g in groups:
            if "rank" in g:
                for k, v in given.items():
                    g.setdefault(k, v)
    return SubspaceOptimizer(groups, lr=lr, base=base, **options)
