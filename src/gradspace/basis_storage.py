"""How a weight's basis is kept between steps: ``basis_dtype`` ``"float32"`` (default), ``"bfloat16"``, or ``"int8"``
with one float32 scale per column (Q-GaLore's idea: the basis changes slowly, so its precision matters less than
its memory).

A stored basis is unpacked to float32 for the step that uses it (every computation with the basis is float32,
as everywhere else) and packed again only if the step replaced or moved it, so an unchanged basis is never
re-quantised. Bytes per k x r basis: float32 ``4kr``, bfloat16 ``2kr``, int8 ``kr + 4r``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

BASIS_DTYPES = ("float32", "bfloat16", "int8")
#: the state entries a stored basis occupies (the same on every rank: never sharded)
STATE_KEYS = ("basis", "basis_scale")


def validate(group: dict, trains_basis: bool) -> None:
    kind = group.get("basis_dtype", "float32")
    if kind not in BASIS_DTYPES:
        raise ValueError(f"basis_dtype must be one of {', '.join(BASIS_DTYPES)}, got {kind!r}")
    if kind != "float32" and trains_basis:
        raise ValueError(
            f"basis_dtype={kind!r} stores the basis rounded between steps; tracker {group['tracker']!r} trains its "
            "basis by small gradient steps, which the rounding would erase: use basis_dtype='float32'"
        )


def basis_bytes(k: int, rank: int, group: dict) -> int:
    kind = group.get("basis_dtype", "float32")
    return {"float32": 4 * k * rank, "bfloat16": 2 * k * rank, "int8": k * rank + 4 * rank}[kind]


def store(state: dict, basis: torch.Tensor, group: dict) -> None:
    """Write a float32 basis into the state in the group's storage format."""
    kind = group.get("basis_dtype", "float32")
    state.pop("basis_scale", None)
    if kind == "float32":
        state["basis"] = basis
    elif kind == "bfloat16":
        state["basis"] = basis.to(torch.bfloat16)
    else:
        scale = basis.abs().amax(dim=0) / 127.0
        codes = torch.round(basis / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127)
        state["basis"], state["basis_scale"] = codes.to(torch.int8), scale


def load(state: dict) -> torch.Tensor:
    """The basis as float32 (the stored tensor itself when it is float32)."""
    basis = state["basis"]
    if basis.dtype == torch.int8:
        return basis.float() * state["basis_scale"]
    return basis.float()


@contextmanager
def unpacked(state: dict, group: dict) -> Iterator[None]:
    """``state["basis"]`` is float32 inside the block; afterwards it is packed again, or the packed tensors put
    back untouched if the block neither replaced nor changed it."""
    if group.get("basis_dtype", "float32") == "float32":
        yield
        return
    packed = (state["basis"], state.get("basis_scale")) if "basis" in state else None
    if packed is not None:
        state["basis"] = load(state)
    before = state.get("basis")
    version = before._version if before is not None else None
    try:
        yield
    finally:
        now = state.get("basis")
        if now is not None and (packed is None or now is not before or now._version != version):
            store(state, now, group)
        elif packed is not None:
            state["basis"] = packed[0]
            if packed[1] is not None:
                state["basis_scale"] = packed[1]
