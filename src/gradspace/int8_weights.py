"""Weights stored in 8 bits: int8 codes with one float32 scale per group of inputs, as Q-GaLore stores its weights.

A 7B model's projected weights take 6.5 GB in int8 instead of 13 in bfloat16 or 26 in float32. ``Int8Weight`` is
a tensor subclass a model holds as its ``nn.Parameter``: it reports the compute dtype (``bfloat16`` or
``float32``) and the weight's shape, so autograd, gradient checkpointing, hooks and the optimizer treat it as a
weight of that dtype, but it stores only the codes and scales:

- ``F.linear`` on it runs through :class:`_Int8Linear`, which dequantises the weight in the forward and again in
  the backward (one layer at a time: no full-precision copy of the model ever exists, and nothing but the codes
  is kept between the two); its gradient is a plain tensor of the compute dtype;
- any other read dequantises to a temporary tensor;
- the optimizer writes an update inside :meth:`Int8Weight.updating`: the weight is read once into a float32
  working copy, every in-place operation (views included) lands there, and on exit the copy is quantised back,
  **stochastically rounded** (``E[q * scale] = w``, so updates far below one code's step survive in expectation),
  or to the nearest code when no generator is given. An in-place operation outside ``updating`` writes back by
  round-to-nearest at once.

Layout (symmetric, absmax): row ``i``'s inputs ``[j g, (j + 1) g)`` share the scale ``max |w| / 120``, so that
element's code is +-120, no code is clipped, and the group can grow 7 steps before it needs a new scale;
``group_size=0`` gives one scale per output channel.
A write-back keeps a group's scale while its largest value stays within 64 to 127 steps, so an element the update
did not move keeps its code exactly (Q-GaLore recomputes every scale at every step, which re-rounds every element
against a new grid: noise on weights no update touched); a group that outgrows it, or shrinks below half of it, is
rescaled.

A model's ``state_dict()`` holds the stored form as plain tensors (``name`` the int8 codes, ``name_scales`` the
scales), so checkpoints, ``weights_only`` loading and ``torch.distributed.checkpoint`` need nothing special;
:func:`dequantized` gives a weight's value for export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

#: Q-GaLore's group of 256 inputs per scale
DEFAULT_GROUP_SIZE = 256
SCALES_SUFFIX = "_scales"
#: a value within this fraction of a step of a code is that code: ``code * scale / scale`` is off by a float32
#: rounding, which stochastic rounding must not turn into a one-step move of an element no update touched
SNAP = 2.0**-12
#: elements quantised or dequantised at a time: whole at once, a 7B weight's float32 temporaries took about 1.2 GB
CHUNK = 1 << 22
#: steps left above a group's largest value when it is given a scale (a rescale re-rounds the whole group: it
#: should be rare, and an update far below one step must not cause one); 120 of the 127 codes are used
ROOM = 7.0


def quantize(
    value: torch.Tensor,
    group_size: int,
    generator: torch.Generator | None = None,
    scales: torch.Tensor | None = None,
):
    """``(codes, scales)`` of a 2-D float tensor: int8 codes (``value``'s shape) and float32 scales (rows x groups).
    ``generator``: stochastic rounding (down or up, up with the probability of the distance from below), else
    round-to-nearest. ``scales``: the weight's current scales, kept for every group whose largest value still fits
    in 64 to 127 steps (so an element the update did not move keeps its code exactly); the others get a new scale.
    Done :data:`CHUNK` elements at a time (whole rows), so its float32 temporaries stay small."""
    rows, cols = value.shape
    g = group_size if group_size and cols % group_size == 0 else cols
    codes = torch.empty(rows, cols, dtype=torch.int8, device=value.device)
    new_scales = torch.empty(rows, cols // g, dtype=torch.float32, device=value.device)
    for a, b in _row_chunks(rows, cols):
        old = None if scales is None else scales[a:b]
        codes[a:b], new_scales[a:b] = _quantize_rows(value[a:b], g, generator, old)
    return codes, new_scales


def _quantize_rows(value: torch.Tensor, g: int, generator: torch.Generator | None, scales: torch.Tensor | None):
    rows, cols = value.shape
    grouped = value.detach().float().reshape(rows, cols // g, g)
    amax = grouped.abs().amax(-1)
    fresh = amax / (127.0 - ROOM)  # the largest value has ROOM steps to grow before its group is rescaled
    if scales is not None:
        fresh = torch.where((amax <= 127.0 * scales) & (amax >= 63.5 * scales), scales, fresh)
    fresh = torch.where(fresh > 0, fresh, torch.ones_like(fresh))  # an all-zero group: any scale, codes 0
    x = grouped / fresh.unsqueeze(-1)
    nearest = x.round()
    if generator is not None:
        up = torch.rand(x.shape, generator=generator, device=x.device) < (x - x.floor())
        # a value on a code already (up to the division's rounding) stays there
        x = torch.where((x - nearest).abs() < SNAP, nearest, x.floor_().add_(up))
    else:
        x = nearest
    return x.clamp_(-127, 127).to(torch.int8).reshape(rows, cols), fresh


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``, dequantised :data:`CHUNK` elements at a time into the result."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    for a, b in _row_chunks(rows, cols):
        part = codes[a:b].reshape(b - a, groups, cols // groups).to(torch.float32) * scales[a:b].unsqueeze(-1)
        out[a:b] = part.reshape(b - a, cols)
    return out


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK // max(1, cols))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


#: stochastic rounding's generator, or a callable giving it when the write-back happens; None: to the nearest code
Rounding = torch.Generator | Callable[[], torch.Generator] | None


class _Store:
    """What a weight and its aliases (``.data``, ``.detach()``) share: codes, scales, the working copy."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group_size: int):
        self.codes, self.scales, self.group_size = codes, scales, group_size
        self.working: torch.Tensor | None = None

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        if self.working is not None:
            return self.working
        return dequantize(self.codes, self.scales, dtype)

    def write(self, value: torch.Tensor, generator: torch.Generator | None = None) -> None:
        codes, scales = quantize(value, self.group_size, generator, self.scales)
        self.codes.copy_(codes)
        if scales.shape != self.scales.shape:
            raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit {tuple(self.scales.shape)}")
        self.scales.copy_(scales)


class Int8Weight(torch.Tensor):
    """A 2-D weight stored as int8 codes and float32 scales, seen as a tensor of ``dtype`` (see the module)."""

    _store: _Store

    @staticmethod
    def __new__(cls, store: _Store, dtype: torch.dtype):
        shape, device = store.codes.shape, store.codes.device
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)

    def __init__(self, store: _Store, dtype: torch.dtype):
        self._store = store

    @classmethod
    def from_float(
        cls, value: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype | None = None
    ) -> Int8Weight:
        if value.dim() != 2 or not value.is_floating_point():
            raise ValueError(f"int8 weights are 2-D floating-point matrices, got {value.dtype} {tuple(value.shape)}")
        if value.is_meta:
            raise ValueError("an int8 weight needs values: materialise the weight before quantising it")
        codes, scales = quantize(value, group_size)
        return cls(_Store(codes, scales, group_size), dtype or value.dtype)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, group_size={self._store.group_size})"

    @property
    def codes(self) -> torch.Tensor:
        return self._store.codes

    @property
    def scales(self) -> torch.Tensor:
        return self._store.scales

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self._store.codes, self._store.scales, dtype or self.dtype)

    def stored_bytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()

    @contextmanager
    def updating(
        self, generator: torch.Generator | Callable[[], torch.Generator] | None = None
    ) -> Iterator[torch.Tensor]:
        """Every write to this weight inside the block lands in one float32 working copy, quantised back on exit
        (stochastically rounded with ``generator``, or the generator a callable returns then, else to the nearest
        code); yields the copy."""
        store = self._store
        if store.working is not None:
            raise RuntimeError("this int8 weight is already being updated")
        store.working = dequantize(store.codes, store.scales, torch.float32)
        try:
            yield store.working
            store.write(store.working, generator() if callable(generator) else generator)
        finally:
            store.working = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if isinstance(w, Int8Weight) and not isinstance(x, Int8Weight) and w._store.working is None:
                return _Int8Linear.apply(x, w, bias)
        with torch._C.DisableTorchFunctionSubclass():  # results stay plain tensors (torch's default wraps them)
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return Int8Weight(args[0]._store, args[0].dtype)
        if func is torch.ops.aten.copy_.default and isinstance(args[0], Int8Weight) and isinstance(args[1], Int8Weight):
            dst, src = args[0]._store, args[1]._store  # load_state_dict: the stored form, exactly
            dst.codes.copy_(src.codes)
            dst.scales.copy_(src.scales)
            return args[0]
        mutable = func._schema.is_mutable
        written: list[tuple[_Store, torch.Tensor]] = []

        def unwrap(t):
            if not isinstance(t, Int8Weight):
                return t
            value = t._store.value(t.dtype if not mutable else torch.float32)
            if mutable and t._store.working is None:
                written.append((t._store, value))
            return value

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        for store, value in written:  # an in-place write outside updating(): to the nearest code at once
            store.write(value)
        if mutable and isinstance(args[0], Int8Weight) and func._schema.returns and not isinstance(out, (list, tuple)):
            return args[0]
        return out


class _Int8Linear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantised in the forward and again in the backward: between the two only the
    codes are kept, where autograd's own ``linear`` would save the dequantised weight of every layer."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x)
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.dequantize(grad_out.dtype)
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (flat_g.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_g.sum(0)
        return grad_x, grad_w, grad_b


def is_int8(p: Any) -> bool:
    return isinstance(p, Int8Weight)


def dequantized(value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A weight's value as a plain tensor (an int8 weight dequantised; any other returned as it is)."""
    return value.dequantize(dtype) if isinstance(value, Int8Weight) else value


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """``name`` -> the int8 codes, ``name_scales`` -> the scales: the stored form, as plain tensors."""
    for name, p in module._parameters.items():
        if isinstance(p, Int8Weight) and prefix + name in state_dict:
            state_dict[prefix + name] = p.codes.detach()
            state_dict[prefix + name + SCALES_SUFFIX] = p.scales.detach()


def _load_pre_hook(module, state_dict, prefix, *args):
    """The stored form back into the weight, exactly; a float value of the right shape is quantised instead."""
    for name, p in module._parameters.items():
        key = prefix + name
        if not isinstance(p, Int8Weight) or key not in state_dict:
            continue
        value, scales = state_dict[key], state_dict.pop(key + SCALES_SUFFIX, None)
        if scales is not None:
            state_dict[key] = Int8Weight(_Store(value, scales, p._store.group_size), p.dtype)
        elif value.is_floating_point():
            state_dict[key] = Int8Weight.from_float(value, p._store.group_size, p.dtype)


def quantize_module_(module: nn.Module, name: str = "weight", group_size: int = DEFAULT_GROUP_SIZE, dtype=None):
    """Replace ``module.<name>`` by its int8 form (the float tensor is released), and make the module's state dict
    hold the stored form."""
    p = getattr(module, name)
    weight = Int8Weight.from_float(p.detach(), group_size, dtype or p.dtype)
    _install(module, name, weight, p.requires_grad)
    return module


def wrap_stored(module: nn.Module, codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype, name="weight"):
    """``module.<name>`` from its stored form (a checkpoint's codes and scales, used as they are)."""
    _install(module, name, Int8Weight(_Store(codes, scales, group_size), dtype or torch.float32), True)
    return module


def _install(module: nn.Module, name: str, weight: Int8Weight, requires_grad: bool) -> None:
    setattr(module, name, nn.Parameter(weight, requires_grad=requires_grad))
    if not getattr(module, "_gradspace_int8_hooks", False):
        module._register_state_dict_hook(_state_dict_hook)
        module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
        module._gradspace_int8_hooks = True


def int8_bytes(model: nn.Module) -> int:
    """Bytes the model's int8 weights store (codes and scales)."""
    return sum(p.stored_bytes() for p in model.parameters() if isinstance(p, Int8Weight))


def int8_modules(model: nn.Module, target_modules=None) -> list[str]:
    """Names of the modules whose weights int8 storage takes: the weights the projected methods project
    (``gradspace.params.select_params``: the blocks' linear layers by default; embeddings and head only when named).
    Works on a model on the meta device."""
    from .params import DEFAULT_TARGETS, select_params

    groups = select_params(model, target_modules or DEFAULT_TARGETS)
    chosen = {id(p) for g in groups if "rank" in g for p in g["params"]}
    return [n for n, m in model.named_modules() if id(getattr(m, "weight", None)) in chosen]


def quantize_model_(
    model: nn.Module, target_modules=None, group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype | None = None
) -> list[str]:
    """Store the target modules' weights in int8, one module at a time; returns their names."""
    names = int8_modules(model, target_modules)
    for name in names:
        quantize_module_(model.get_submodule(name), "weight", group_size, dtype)
    return names
