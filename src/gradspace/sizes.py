"""Memory sizes as people write them (``24GiB``, ``20 GB``), for budgets; a leaf module."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}
UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``"24GiB"``, ``"20 GB"``, ``"512M"`` -> bytes (GiB = 2**30, GB = 10**9)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"a memory size is a positive number and a unit, such as 24GiB or 20GB; got {text!r}")
    return int(float(match.group(1)) * UNITS[unit])
