"""Choosing which weights are projected, and building galore-torch / Hugging Face style param groups."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

DEFAULT_TARGETS = ("attn", "mlp")
Target = str | re.Pattern


def _matches(name: str, target: Target) -> bool:
    if isinstance(target, re.Pattern):
        return target.search(name) is not None
    if target in name:
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def _head_names(model: nn.Module) -> set[str]:
    """Names of the output head and embedding modules, which are only projected when named explicitly."""
    heads = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.add(id(out))
    return {name for name, m in model.named_modules() if id(m) in heads}


def select_params(
    model: nn.Module,
    target_modules: Target | Sequence[Target] = DEFAULT_TARGETS,
    **projection: Any,
) -> list[dict[str, Any]]:
    """Param groups: ``[{"params": projected, "param_names": ..., "rank": ..., ...}, {"params": rest, ...}]``.

    ``target_modules`` is a substring, a regex (full match), a compiled pattern, a list of those, or
    ``"all-linear"``. Only 2-D ``nn.Linear`` weights are projected; embeddings and the output head only when a target
    names them exactly. A target that selects a module whose weight is not 2-D is an error. ``projection`` keys
    (``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` ...) go into the projected group; ``rank`` defaults
    to 128 as in galore-torch.
    """
    targets: list[Target] = [target_modules] if isinstance(target_modules, (str, re.Pattern)) else list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty; name at least one module, or use 'all-linear'")
    all_linear = "all-linear" in targets
    heads = _head_names(model)
    chosen: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            continue
        explicit = any(isinstance(t, str) and (t == mod_name or t == mod_name.rsplit(".", 1)[-1]) for t in targets)
        if mod_name in heads and not explicit:
            continue
        hit = (all_linear and isinstance(module, nn.Linear)) or any(
            _matches(mod_name, t) for t in targets if t != "all-linear"
        )
        if not hit:
            continue
        if weight.dim() != 2:
            if explicit or (not isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(list(module.children())) == 0):
                raise ValueError(
                    f"target_modules selects {mod_name}.weight of shape {tuple(weight.shape)}, but only 2-D weights "
                    "can be projected; narrow target_modules (e.g. 'attn', 'mlp', or 'all-linear')"
                )
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)) or explicit:
            chosen.setdefault(id(weight), f"{mod_name}.weight")
    if not chosen:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"target_modules {targets!r} matched no 2-D linear weight; linear modules include: {', '.join(linear)}"
        )
    projected, projected_names, rest, rest_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in chosen:
            projected.append(p)
            projected_names.append(name)
        else:
            rest.append(p)
            rest_names.append(name)
    group = {"params": projected, "param_names": projected_names, "rank": 128}
    group.update(projection)
    groups = [group]
    if rest:
        groups.append({"params": rest, "param_names": rest_names})
    return groups


def as_groups(params: nn.Module | Iterable) -> list[dict[str, Any]]:
    """Normalise a module, an iterable of tensors, or of group dicts, into a list of group dicts."""
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    items = list(params)
    if items and isinstance(items[0], dict):
        return [dict(g) for g in items]
    return [{"params": items}]
