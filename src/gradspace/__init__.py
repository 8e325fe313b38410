"""gradspace: train with the optimizer running in a moving low-rank subspace of each weight's gradient."""

from .methods import METHODS, create_optimizer, register_method, unregister_method
from .optimizer import SubspaceOptimizer, optimizer_state_bytes
from .params import select_params
from .rules import register_rule, unregister_rule
from .trackers import register_tracker, unregister_tracker

__all__ = [
    "METHODS",
    "SubspaceOptimizer",
    "create_optimizer",
    "optimizer_state_bytes",
    "register_method",
    "register_rule",
    "register_tracker",
    "select_params",
    "unregister_method",
    "unregister_rule",
    "unregister_tracker",
]
__version__ = "0.1.0"
