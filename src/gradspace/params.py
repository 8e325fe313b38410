"""Choosing which weights are projected, and building galore-torch / Hugging Face style param groups."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

DEFAULT_TARGETS = ("attn", "mlp")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): a linear layer whose weight is stored
    transposed, (in, out). Recognised by name so that the core never imports transformers."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


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
    ``"all-linear"``. Only 2-D weights of ``nn.Linear`` and transformers' ``Conv1D`` are projected; embeddings and
    the output head only when a target names them exactly. A target that selects a module whose weight is not 2-D
    is an error. ``projection`` keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` ...) go into the
    projected group; ``rank`` defaults to 128 as in galore-torch. ``Conv1D`` weights (stored as (in, out)) get a
    projected group of their own with ``"transposed": True``, so that they are projected exactly as the equivalent
    ``nn.Linear`` weight (out, in) would be.
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
        hit = (all_linear and _linear(module)) or any(_matches(mod_name, t) for t in targets if t != "all-linear")
        if not hit:
            continue
        if weight.dim() != 2:
            if explicit or (not isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(list(module.children())) == 0):
                raise ValueError(
                    f"target_modules selects {mod_name}.weight of shape {tuple(weight.shape)}, but only 2-D weights "
                    "can be projected; narrow target_modules (e.g. 'attn', 'mlp', or 'all-linear')"
                )
            continue
        if _linear(module) or isinstance(module, nn.Embedding) or explicit:
            chosen.setdefault(id(weight), is_conv1d(module))
    if not chosen:
        raise ValueError(f"target_modules {targets!r} matched no 2-D linear weight; {_candidates(model, heads)}")
    linear: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}  # by "stored transposed"
    rest, rest_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in chosen:
            params, names = linear[chosen[id(p)]]
            params.append(p)
            names.append(name)
        else:
            rest.append(p)
            rest_names.append(name)
    groups = []
    for transposed, (params, names) in linear.items():
        if params:
            group = {"params": params, "param_names": names, "rank": 128, **projection}
            if transposed:
                group["transposed"] = True
            groups.append(group)
    if rest:
        groups.append({"params": rest, "param_names": rest_names})
    return groups


def _candidates(model: nn.Module, heads: set[str]) -> str:
    """What a target could have matched: the distinct names of the model's linear modules (the head apart)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _linear(m) and n not in heads})
    head = sorted(heads & {n for n, m in model.named_modules() if _linear(m)})
    if not leaves:
        return "the model has no linear module to project" + (f" except its head ({', '.join(head)})" if head else "")
    return f"its linear modules are named {', '.join(leaves)} (targets match substrings, regexes or 'all-linear')" + (
        f"; the head {', '.join(head)} is projected only when named exactly" if head else ""
    )


def as_groups(params: nn.Module | Iterable) -> list[dict[str, Any]]:
    """Normalise a module, an iterable of tensors, or of group dicts, into a list of group dicts."""
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    items = list(params)
    if items and isinstance(items[0], dict):
        return [dict(g) for g in items]
    return [{"params": items}]
