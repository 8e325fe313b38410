"""Inner rules: the optimizer that runs inside the subspace (and, unchanged, on full-rank parameters)."""

from ..components import check_declarations, register, unregister
from .adafactor import Adafactor
from .adam8bit import AdamW8bit
from .adamw import AdamW
from .base import InnerRule
from .lion import Lion
from .sgd import SGD

RULES: dict[str, InnerRule] = {}


def register_rule(name: str, rule: InnerRule, *, replace: bool = False) -> InnerRule:
    """Make ``rule`` (an instance of an ``InnerRule`` subclass that implements ``init_state``, ``update`` and
    ``state_bytes``) available as ``base=name``; its declarations are checked here (``gradspace.components``)."""
    check_declarations("inner rule", name, rule, InnerRule, ("init_state", "update", "state_bytes"))
    return register(RULES, "inner rule", name, rule, replace=replace)


def unregister_rule(name: str) -> None:
    unregister(RULES, "inner rule", name)


for _rule in (AdamW(), AdamW8bit(), Adafactor(), Lion(), SGD()):
    register_rule(_rule.name, _rule)


def get_rule(name: str) -> InnerRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown inner rule (base) {name!r}; choose one of {', '.join(sorted(RULES))}") from None


__all__ = ["RULES", "InnerRule", "get_rule", "register_rule", "unregister_rule"]
