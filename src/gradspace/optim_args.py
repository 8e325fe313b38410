"""The one ``key=value,...`` grammar: ``--optim-args``, the HF Trainer's ``optim_args`` and compare's method options
(``;`` between items) all read options with it. A leaf module (standard library only), so that the CLI and the HF
integration share it without pulling in each other's dependencies.

As the Trainer's own parser does, whitespace anywhere is dropped (``"rank = 8"`` is ``rank=8``) and a value holds no
comma (betas are ``beta1=0.9,beta2=0.999``; a config file may give a list). Unlike it, a value is read as what it
spells (the Trainer leaves strings for each optimizer to convert): ``true``/``false`` (any case), ``none``/``null``,
an int, a float (``-1e-3``, ``inf``), else the string itself.
"""

from __future__ import annotations

from typing import Any


def parse(value: Any, name: str = "optim-args", sep: str = ",") -> dict[str, Any]:
    """``"eta=1.0,accumulate=false"`` -> ``{"eta": 1.0, "accumulate": False}``; a mapping (a config file's) is
    taken as it is; ``None`` and ``""`` are no options; empty items are skipped, a later key wins. Anything else,
    or an item that is not ``key=value``, is a :class:`ValueError` starting with ``name``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be key=value pairs separated by {sep!r}, got {value!r}")
    out = {}
    for item in "".join(value.split()).split(sep):
        if not item:
            continue
        key, eq, raw = item.partition("=")
        if not eq or not key or not raw or "=" in raw:
            tuple_like = sep == "," and any(c in value for c in "([")
            hint = " (a value holds no comma: beta1=0.9,beta2=0.999, not betas=(0.9,0.999))" if tuple_like else ""
            raise ValueError(f"{name}: {item!r} is not key=value{hint}")
        out[key] = literal(raw)
    return out


def literal(raw: str) -> Any:
    """A value as what it spells: a bool, None, an int, a float, else the string."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw
