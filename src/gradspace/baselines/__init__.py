"""The baselines of the papers' own tables, run by the same ``pretrain`` / ``finetune`` / ``compare`` machinery as
the subspace methods: LoRA and DoRA (through peft), ReLoRA, BAdam (through the ``badam`` package), the factorised
low-rank model, and full-rank 8-bit AdamW.

A subspace method is an optimizer over the model as it is; a baseline may change the model (adapters, factorised
weights) or the optimizer (block coordinate descent). A baseline is one object of a :class:`Baseline` subclass,
in one file of this package, registered in :data:`BASELINES`:

- ``defaults``: its own options with their defaults (given as ``--optim-args alpha=16`` or
  ``compare --methods lora:alpha=16``); every other optim-arg goes to the inner rule, as for every method;
- ``prepare(model, ...)``: the model to train (its trainable parameters set);
- ``optimizer(model, ...)``: by default the full-rank ``SubspaceOptimizer`` of the run's inner rule over the
  trainable parameters (so its state is counted, checkpointed and resumed like every method's);
- ``schedule`` / ``after_step``: ReLoRA's restarts;
- ``merged(model)``: the plain Hugging Face model the run exports (adapters merged into their weights);
  ``adapter(model)``: the peft model whose adapter folder is written beside it, if any.
"""

from __future__ import annotations

from ..methods import METHODS
from .base import Baseline


def _registry() -> dict[str, Baseline]:
    from .adamw8bit import AdamW8bitBaseline
    from .badam import BAdam
    from .lora import LoRA
    from .lowrank import LowRank
    from .relora import ReLoRA

    return {b.name: b for b in (AdamW8bitBaseline(), LoRA("lora"), LoRA("dora"), ReLoRA(), BAdam(), LowRank())}


#: baseline name -> its object
BASELINES: dict[str, Baseline] = _registry()


def method_names() -> list[str]:
    """Every name ``--method`` and ``compare --methods`` take: the subspace presets, then the baselines."""
    return [*METHODS, *(b for b in BASELINES if b not in METHODS)]


def is_known(name: str) -> bool:
    return name in METHODS or name in BASELINES


def is_projected(name: str) -> bool:
    """A subspace method (it has a projection: rank, update gap, scale)."""
    return METHODS.get(name) is not None


def takes_rank(name: str) -> bool:
    """``--rank`` applies: a subspace method, or a baseline with adapters or factors of a rank."""
    return is_projected(name) or (name in BASELINES and BASELINES[name].uses_rank)


def baseline_of(name: str) -> Baseline | None:
    return BASELINES.get(name) if name not in METHODS else None
