"""How a weight's basis is kept between steps: ``basis_dtype`` ``"float32"`` (default), ``"bfloat16"``, ``"int8"``
with one float32 scale per column, or ``"int4"``, Q-GaLore's layout (Q-GaLore's idea: the basis changes slowly, so
its precision matters less than its memory).

``int4`` is q-galore-torch 1.0's ``_quantize(n_bit=4, q_group_size=256)``: each basis vector cut in groups of 256
entries (one group per vector when its length is not a multiple of 256), each group asymmetric with a float32
scale ``(max - min) / 15`` and zero point ``round(-min / scale)``, codes ``round(w / scale) + zero`` clipped to
0..15, packed two to a byte. Q-GaLore groups the flattened ``(r, k)`` matrix of a basis on the right and the
flattened ``(k, r)`` one of a basis on the left; gradspace groups along each basis vector in both orientations,
which is Q-GaLore's layout whenever the basis is on the right.

A stored basis is unpacked to float32 for the step that uses it (every computation with the basis is float32,
as everywhere else) and packed again only if the step replaced or moved it, so an unchanged basis is never
re-quantised. Bytes per k x r basis: float32 ``4kr``, bfloat16 ``2kr``, int8 ``kr + 4r``, int4 ``kr / 2`` plus 8
per group and 16 for its shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

BASIS_DTYPES = ("float32", "bfloat16", "int8", "int4")
#: the state entries a stored basis occupies (the same on every rank: never sharded)
STATE_KEYS = ("basis", "basis_scale", "basis_zero", "basis_shape")
INT4_GROUP = 256


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
    if kind == "int4":
        groups = rank * (k // INT4_GROUP if k % INT4_GROUP == 0 else 1)
        return (k * rank + 1) // 2 + 8 * groups + 16
    return {"float32": 4 * k * rank, "bfloat16": 2 * k * rank, "int8": k * rank + 4 * rank}[kind]


def store(state: dict, basis: torch.Tensor, group: dict) -> None:
    """Write a float32 basis into the state in the group's storage format."""
    kind = group.get("basis_dtype", "float32")
    for key in STATE_KEYS[1:]:
        state.pop(key, None)
    if kind == "float32":
        state["basis"] = basis
    elif kind == "bfloat16":
        state["basis"] = basis.to(torch.bfloat16)
    elif kind == "int4":
        state["basis"], state["basis_scale"], state["basis_zero"] = quantize_int4(basis)
        state["basis_shape"] = torch.tensor(basis.shape)
    else:
        scale = basis.abs().amax(dim=0) / 127.0
        codes = torch.round(basis / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127)
        state["basis"], state["basis_scale"] = codes.to(torch.int8), scale


def basis_shape(state: dict) -> tuple[int, int]:
    """``(k, r)`` of a stored basis, whatever its storage (a packed 4-bit one is a flat byte tensor)."""
    if "basis_shape" in state:
        k, r = state["basis_shape"].tolist()
        return k, r
    return tuple(state["basis"].shape)


def load(state: dict) -> torch.Tensor:
    """The basis as float32 (the stored tensor itself when it is float32)."""
    basis = state["basis"]
    if basis.dtype == torch.int8:
        return basis.float() * state["basis_scale"]
    if basis.dtype == torch.uint8:
        k, r = state["basis_shape"].tolist()
        return dequantize_int4(basis, state["basis_scale"], state["basis_zero"], k, r)
    return basis.float()


def quantize_int4(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed codes, scales, zero points)`` of a k x r basis in Q-GaLore's 4-bit layout (module docstring)."""
    vectors = basis.detach().float().mT  # r x k: one row per basis vector
    k = vectors.shape[1]
    w = vectors.reshape(-1, INT4_GROUP if k % INT4_GROUP == 0 else k)
    high, low = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / 15
    zero = (-torch.round(low / scale)).clamp_(0, 15)
    codes = torch.clamp(torch.round(w / scale) + zero, 0, 15).to(torch.uint8).flatten()
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int, r: int) -> torch.Tensor:
    codes = torch.stack([packed & 15, packed >> 4], dim=1).flatten()[: k * r]
    w = scale * (codes.view(scale.shape[0], -1).float() - zero)
    return w.reshape(r, k).mT.contiguous()


@contextmanager
def unpacked(state: dict, group: dict) -> Iterator[None]:
    """``state["basis"]`` is float32 inside the block; afterwards it is packed again, or the packed tensors put
    back untouched if the block neither replaced nor changed it."""
    if group.get("basis_dtype", "float32") == "float32":
        yield
        return
    packed = {key: state[key] for key in STATE_KEYS if key in state} if "basis" in state else None
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
            state.update(packed)
