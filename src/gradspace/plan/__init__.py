"""Will it fit: the predicted peak memory of a training run, line by line (``plan_memory``), the configurations
that fit a budget, and the check ``gradspace pretrain`` makes before it builds its model (``fit``)."""

from ..sizes import parse_bytes
from .fit import available, fitting
from .memory import Line, Plan, Setup, plan_memory

__all__ = ["Line", "Plan", "Setup", "available", "fitting", "parse_bytes", "plan_memory"]
