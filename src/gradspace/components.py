"""What a tracker or an inner rule declares, and registering one (``gradspace.register_tracker`` ...).

A component is a stateless object whose class says, besides its methods:

- ``defaults``: every option it reads, with its default (the optimizer routes an option to the component that
  declares it, and names that component in the error for a misspelt or misplaced one);
- ``structural``: the options that fix the layout of its state, which a checkpoint saved with another value cannot
  be loaded into;
- ``state_keys``: every entry it may write into a parameter's state, each mapped to :data:`LIKE_GRAD` (a tensor
  shaped like the gradient the component reads, element for element, so an FSDP2 shard holds the matching part of
  it) or None (anything else: counters, scales, replicated tensors). The optimizer resets, counts, shards and checks
  saved state through these declarations, never by the look of a key's name.

Registration checks the declarations once, so that a mistake is an error there rather than a wrong result later.
"""

from __future__ import annotations

from typing import Any

#: a state entry shaped like the component's gradient, element for element (sharded with it under FSDP2)
LIKE_GRAD = "grad"
#: option names that belong to the optimizer and its param groups: no component may declare them
RESERVED_OPTIONS = frozenset(
    {"params", "param_names", "lr", "weight_decay", "base", "rank", "tracker", "moments", "update_proj_gap", "scale"}
    | {"proj_type", "seed", "nonfinite", "diagnostics", "distributed", "process_group", "state_dtype", "transposed"}
)


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
