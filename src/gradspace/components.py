"""What a tracker or an inner rule declares, and registering one (``gradspace.register_tracker`` ...).

A component is a stateless object whose class says, besides its methods:

- ``defaults``: every option it reads, with its default (the optimizer routes an option to the component that
  declares it, and names that component in the error for a misspelt or misplaced one);
- ``structural``: the options that fix the layout of its state, which a checkpoint saved with another value cannot
  be loaded into;
- ``state_keys``: every entry it may write into its part of a parameter's state, each mapped to :data:`LIKE_GRAD`
  (a tensor shaped like the gradient the component reads, element for element, so an FSDP2 shard holds the
  matching part of it) or None (anything else: counters, scales, replicated tensors). The optimizer resets, counts,
  shards and checks saved state through these declarations, never by the look of a key's name.

A parameter's state is nested by owner (:data:`PARTS`): ``state["rule"]`` is the inner rule's, ``state["tracker"]``
the tracker's, ``state["output"]`` the output rule's (the norm-growth limiter); the optimizer's own entries (the
``step`` and ``updates`` counters, the stagger ``phase``, the stored basis) sit at the top. A component is handed
its own part only (a tracker through :class:`TrackerState`, which adds read-only access to the step clock and the
basis), so two components cannot clash on a key, and checkpoints stay plain nested dicts of tensors and numbers
(``torch.load(weights_only=True)`` reads them).

Registration checks the declarations once, so that a mistake is an error there rather than a wrong result later.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

#: a state entry shaped like the component's gradient, element for element (sharded with it under FSDP2)
LIKE_GRAD = "grad"
#: option names that belong to the optimizer and its param groups: no component may declare them
RESERVED_OPTIONS = frozenset(
    {"params", "param_names", "lr", "weight_decay", "base", "rank", "tracker", "moments", "update_proj_gap", "scale"}
    | {"proj_type", "seed", "nonfinite", "diagnostics", "distributed", "process_group", "state_dtype", "transposed"}
)


#: the owners of a parameter's nested state, in the order they are listed and saved
PARTS = ("rule", "tracker", "output")


class TrackerState(MutableMapping):
    """A tracker's part of a parameter's state (``state["tracker"]``), as a mapping it reads and writes, with the
    optimizer's clock and basis beside it, read-only: ``step`` (the step about to run, or that just ran in
    ``after_step``), ``updates`` (subspace refreshes so far), ``phase`` (the stagger offset, 0 without
    ``update_stagger``) and ``basis`` (the current k x r basis, float32 during a step)."""

    __slots__ = ("_core", "_own")

    def __init__(self, core: dict):
        self._core = core
        self._own = core.setdefault("tracker", {})

    @property
    def step(self) -> int:
        return self._core["step"]

    @property
    def updates(self) -> int:
        return self._core.get("updates", 0)

    @property
    def phase(self) -> int:
        return self._core.get("phase", 0)

    @property
    def basis(self) -> torch.Tensor:
        return self._core["basis"]

    def __getitem__(self, key: str) -> Any:
        return self._own[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._own[key] = value

    def __delitem__(self, key: str) -> None:
        del self._own[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._own)

    def __len__(self) -> int:
        return len(self._own)


def part(state: dict, owner: str) -> dict:
    """``owner``'s part of a parameter's state (made empty on first use)."""
    return state.setdefault(owner, {})


def flat_items(state: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("step", 3), ("rule.exp_avg", tensor), ...``: a parameter's nested state with dotted keys (the flat
    names a DCP checkpoint stores and ``SubspaceOptimizer.state_shard_dim`` takes). An empty part yields nothing:
    the optimizer makes a missing part on first use (:func:`part`), so it is the same state as an empty one."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_flat(state: dict, key: str, value: Any) -> None:
    """The inverse of :func:`flat_items` for one entry: ``set_flat(st, "rule.exp_avg", t)``."""
    *owners, last = key.split(".")
    for owner in owners:
        state = state.setdefault(owner, {})
    state[last] = value


def check_declarations(kind: str, name: str, obj: Any, base: type, required: tuple[str, ...]) -> None:
    """Raise TypeError/ValueError naming what is wrong with a component about to be registered."""
    if isinstance(obj, type) or not isinstance(obj, base):
        raise TypeError(f"{kind} {name!r}: register an instance of a {base.__name__} subclass, got {obj!r}")
    missing = [m for m in required if getattr(type(obj), m, None) is getattr(base, m)]
    if missing:
        raise TypeError(f"{kind} {name!r} ({type(obj).__name__}) does not implement {', '.join(missing)}")
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"{kind} name must be a non-empty string without surrounding spaces, got {name!r}")
    if obj.name not in ("", name):
        raise ValueError(f"{kind} {name!r}: its class says name = {obj.name!r}; register it under that name")
    if not isinstance(obj.defaults, dict):
        raise TypeError(f"{kind} {name!r}: defaults must be a dict of option -> default")
    reserved = sorted(set(obj.defaults) & RESERVED_OPTIONS)
    if reserved:
        raise ValueError(f"{kind} {name!r} declares option(s) {', '.join(reserved)}, which belong to the optimizer")
    loose = sorted(set(obj.structural) - set(obj.defaults))
    if loose:
        raise ValueError(f"{kind} {name!r}: structural option(s) {', '.join(loose)} are not in its defaults")
    if not isinstance(obj.state_keys, dict) or any(v not in (None, LIKE_GRAD) for v in obj.state_keys.values()):
        raise TypeError(f"{kind} {name!r}: state_keys must map each state key to LIKE_GRAD or None")


def register(table: dict, kind: str, name: str, obj: Any, *, replace: bool) -> Any:
    """Put ``obj`` in ``table`` under ``name``; a name already taken is an error unless ``replace``."""
    if name in table and not replace:
        raise ValueError(f"{kind} {name!r} is already registered; pick another name or pass replace=True")
    if obj.name != name:
        obj.name = name
    table[name] = obj
    return obj


def unregister(table: dict, kind: str, name: str) -> None:
    if name not in table:
        raise ValueError(f"no {kind} {name!r} is registered")
    del table[name]
