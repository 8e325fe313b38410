"""Hugging Face Trainer and Accelerate: a gradspace optimizer built from ``TrainingArguments``.

    args = TrainingArguments("out", learning_rate=1e-3, optim_target_modules=["attn", "mlp"],
                             optim_args="rank=128,update_proj_gap=200,scale=0.25")
    opt = create_hf_optimizer(model, args, "galore")
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))  # scheduler: args

``GradspaceTrainer(..., method="galore")`` does the same from inside the Trainer, where the Trainer refuses
a ready optimizer (``model_init``, FSDP). It honours the Trainer's GaLore and APOLLO names (``optim="galore_adamw"``,
``"apollo_adamw"`` ...), and with ``GradspaceTrainingArguments`` also ``optim="gradspace"`` with
``optim_args="method=subtrack++,rank=128"``. The optimizer is a plain ``torch.optim.Optimizer``:
``accelerator.prepare`` wraps it like any other, and its ``state_dict()`` loads with
``torch.load(weights_only=True)``, as the Trainer's resume does.

Layer-wise mode (``layerwise=True``) steps each weight inside backward and frees its gradient at once.
Gradient accumulation works: the windows are the Trainer's own (Accelerate's ``sync_gradients``), and the
Trainer's ``optimizer.step()`` and ``zero_grad()`` find no gradients left. What it cannot do: clip by the
global gradient norm (no gradient outlives its own backward step, so ``max_grad_norm`` has no effect and the
logged ``grad_norm`` is 0), or run under DDP (a weight would step before its gradient is averaged).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments

from ..layerwise import Layerwise
from ..methods import METHODS, PROJECTION_KEYS, create_optimizer, preset_projection
from ..optim_args import parse as parse_options
from ..optimizer import SubspaceOptimizer
from ..params import DEFAULT_TARGETS, as_groups, select_params
from ..rules import get_rule

log = logging.getLogger(__name__)


def parse_optim_args(optim_args: str | dict[str, Any] | None) -> dict[str, Any]:
    """Options from a ``"rank=8,scale=0.25,base=lion"`` string (the ``TrainingArguments.optim_args`` format, read
    as the Trainer reads it: spaces dropped, comma-separated ``key=value``) or a dict. String values become ints,
    floats, booleans or None where they read as one (``gradspace.optim_args``): ``rank=8`` is 8.
    """
    return parse_options(optim_args, "optim_args")


def create_hf_optimizer(
    model: nn.Module,
    args: Any,
    method: str | None = None,
    *,
    target_modules: str | re.Pattern | Sequence | None = None,
    optim_args: str | dict[str, Any] | None = None,
    layerwise: bool = False,
    **options: Any,
) -> SubspaceOptimizer:
    """A gradspace optimizer for ``Trainer(..., optimizers=(opt, None))``, configured like the Trainer's own.

    From ``args`` (a ``TrainingArguments``): ``learning_rate``; ``weight_decay`` on the parameters the Trainer
    decays (not biases and norms); ``(adam_beta1, adam_beta2)`` and ``adam_epsilon`` where the inner rule has
    ``betas``/``eps`` (as the Trainer gives Lion the Adam betas), except that ``adam_epsilon`` at the Trainer's
    default 1e-8 leaves gradspace's eps (1e-6, galore-torch's and apollo-torch's) so that every entry point has the
    same defaults (set ``adam_epsilon`` to anything else, or ``eps=`` in ``optim_args``, to choose it);
    ``seed`` for the random trackers; ``method`` from ``optim_args`` (``method=fira``) when not given here;
    ``optim_target_modules`` and ``optim_args`` when not given here. ``target_modules`` follows
    :func:`gradspace.select_params`: substrings, regexes, ``"all-linear"`` (default ``("attn", "mlp")``);
    unlike the Trainer's GaLore, the output head and embeddings are projected only when named.

    Options, later ones winning: ``args.optim_args``, then ``optim_args`` (string or dict), then keyword
    ``options``: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``base``, ``beta1``/``beta2``, and
    any tracker or rule option of :func:`gradspace.create_optimizer`.
    """
    return _build(model, args, method, target_modules, optim_args, layerwise, options, _decay_names(model))


def _build(model, args, method, target_modules, optim_args, layerwise, options, decay_names):
    """Shared by create_hf_optimizer and GradspaceTrainer, which passes its own (overridable) decay names.
    ``method`` None: the ``method`` key of the options, else GaLore."""
    opts = {**parse_optim_args(args.optim_args), **parse_optim_args(optim_args), **options}
    named = opts.pop("method", None)
    if named is not None and method is not None and str(named).lower() != method.lower():
        raise ValueError(f"optim_args ask for method={named!r}, but method={method!r} was given: keep one")
    method = method or named or "galore"
    key = method.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _apollo_proj(opts)
    base = opts.pop("base", "adamw")
    rule = get_rule(base)
    explicit = {"betas", "beta1", "beta2"} & set(opts)  # set for a rule without betas: the optimizer objects
    betas = list(opts.pop("betas", (args.adam_beta1, args.adam_beta2)))
    for i, name in enumerate(("beta1", "beta2")):
        if name in opts:
            betas[i] = float(opts.pop(name))
    if "betas" in rule.defaults or explicit:
        opts["betas"] = tuple(betas)
    if "eps" in rule.defaults and args.adam_epsilon != TRAINER_EPS:
        opts.setdefault("eps", args.adam_epsilon)  # set by the user; at the Trainer's default, gradspace's own
    opts.setdefault("seed", args.seed)
    projection = {k: opts.pop(k) for k in PROJECTION_KEYS if k in opts}
    if METHODS[key] is None:  # full rank: create_optimizer rejects any projection key given
        groups, opts = as_groups(model), {**opts, **projection}
    else:
        targets = target_modules if target_modules is not None else args.optim_target_modules
        if isinstance(targets, str) and targets.replace("_", "-") == "all-linear":
            targets = "all-linear"
        projection = {**preset_projection(key), **projection}
        groups = select_params(model, targets if targets is not None else DEFAULT_TARGETS, **projection)
    groups = _split_decay(groups, decay_names, args.weight_decay)
    opt = create_optimizer(key, groups, lr=args.learning_rate, base=base, weight_decay=args.weight_decay, **opts)
    if layerwise:
        _attach_layerwise(opt, args)
    return opt


#: ``TrainingArguments.adam_epsilon``'s default: taken as "not set", so that one eps default (gradspace's, the
#: reference packages' 1e-6) holds whichever entry point builds the optimizer
TRAINER_EPS = TrainingArguments.__dataclass_fields__["adam_epsilon"].default


def _apollo_proj(opts: dict) -> None:
    """The Trainer's APOLLO option ``proj`` (``random`` or ``svd``) names gradspace's tracker."""
    proj = opts.pop("proj", None)
    if proj is None:
        return
    trackers = {"random": "gaussian", "svd": "svd"}
    if proj not in trackers:
        raise ValueError(f"optim_args proj={proj!r}: choose proj=random (APOLLO's Gaussian) or proj=svd")
    opts.setdefault("tracker", trackers[proj])


def _decay_names(model: nn.Module) -> set[str]:
    """The parameter names the Trainer applies weight decay to (its method does not use ``self``)."""
    return set(Trainer.get_decay_parameter_names(None, model))


def _split_decay(groups: list[dict], decay_names: set[str], weight_decay: float) -> list[dict]:
    """Each group split into its decayed and undecayed parameters, as the Trainer's own optimizer does."""
    out = []
    for group in groups:
        names = group["param_names"]
        for decayed in (True, False):
            keep = [i for i, name in enumerate(names) if (name in decay_names) == decayed]
            if keep:
                out.append(
                    {
                        **group,
                        "params": [group["params"][i] for i in keep],
                        "param_names": [names[i] for i in keep],
                        "weight_decay": weight_decay if decayed else 0.0,
                    }
                )
    return out


def _attach_layerwise(opt: SubspaceOptimizer, args: Any) -> None:
    """Step inside backward at the Trainer's accumulation boundaries; ``opt.layerwise.remove()`` undoes it."""
    from accelerate.state import GradientState

    if args.world_size > 1:
        raise NotImplementedError(
            "layer-wise mode steps each weight inside backward, before DDP has averaged its gradient across "
            f"processes; run it on one process (world size is {args.world_size}) or use layerwise=False"
        )
    if args.max_grad_norm and args.max_grad_norm > 0:
        log.warning(
            "layer-wise mode frees each gradient inside backward, so the Trainer's clipping to "
            "max_grad_norm=%s has no effect (and its logged grad_norm is 0); set max_grad_norm=0 to silence "
            "this",
            args.max_grad_norm,
        )
    opt.layerwise = Layerwise(opt, sync=lambda: GradientState().sync_gradients)


#: the Trainer's own names for GaLore and APOLLO (``TrainingArguments(optim=...)``) -> (gradspace preset, inner
#: rule, layer-wise)
TRAINER_OPTIM = {
    "galore_adamw": ("galore", "adamw", False),
    "galore_adamw_8bit": ("galore", "adamw8bit", False),
    "galore_adafactor": ("galore", "adafactor", False),
    "galore_adamw_layerwise": ("galore", "adamw", True),
    "galore_adamw_8bit_layerwise": ("galore", "adamw8bit", True),
    "galore_adafactor_layerwise": ("galore", "adafactor", True),
    "apollo_adamw": ("apollo", "adamw", False),
    "apollo_adamw_layerwise": ("apollo", "adamw", True),
}
#: ``optim`` values that mean "the Trainer's default": GradspaceTrainer's own ``method`` decides
DEFAULT_OPTIM = ("adamw_torch", "adamw_torch_fused")
#: ``GradspaceTrainingArguments(optim="gradspace", optim_args="method=subtrack++,rank=128")``
GRADSPACE_OPTIM = "gradspace"


def resolve_trainer_optim(optim: Any, method: str | None, layerwise: bool, options: dict) -> tuple[str, bool, dict]:
    """``(method, layerwise, options)`` from ``args.optim`` and GradspaceTrainer's own arguments; an ``optim``
    that gradspace cannot honour is an error, never silently replaced."""
    name = str(getattr(optim, "value", optim))
    if name in TRAINER_OPTIM:
        preset, base, lw = TRAINER_OPTIM[name]
        if method is not None and method != preset:
            raise ValueError(f"args.optim={name!r} asks for {preset}, but method={method!r} was given: keep one")
        return preset, lw or layerwise, {"base": base, **options}
    if name in DEFAULT_OPTIM or name == GRADSPACE_OPTIM:  # None: optim_args' method=, else GaLore
        return method, layerwise, options
    raise ValueError(
        f"GradspaceTrainer builds a gradspace optimizer, so args.optim={name!r} cannot be honoured: use "
        f"GradspaceTrainingArguments(optim='gradspace', optim_args='method=...'), leave optim at its default and "
        f"pass method= (one of {', '.join(METHODS)}), or use one of {', '.join(TRAINER_OPTIM)}"
    )


def require_trainer_targets(optim: Any, target_modules: Any, args: Any) -> None:
    """The Trainer's GaLore and APOLLO names project only the modules ``optim_target_modules`` names, and the
    Trainer refuses them without it: so does GradspaceTrainer, rather than project gradspace's defaults unasked."""
    name = str(getattr(optim, "value", optim))
    if name in TRAINER_OPTIM and target_modules is None and getattr(args, "optim_target_modules", None) is None:
        raise ValueError(
            f"args.optim={name!r} needs the modules to project: set TrainingArguments(optim_target_modules=...) "
            "(e.g. ['attn', 'mlp'], a regex, or 'all-linear'), as the Trainer requires, or pass target_modules= "
            "to GradspaceTrainer"
        )


class GradspaceTrainingArguments(TrainingArguments):
    """``TrainingArguments`` that also accept ``optim="gradspace"``, with the method and its options in
    ``optim_args`` (``"method=subtrack++,rank=128,update_proj_gap=200"``), for ``GradspaceTrainer``. The
    Trainer's own argument class refuses names it does not know, so this subclass stands in for it; everything
    else is unchanged (the plain ``Trainer`` cannot build this optimizer: use ``GradspaceTrainer``)."""

    def __post_init__(self):
        ours = str(self.optim) == GRADSPACE_OPTIM
        if ours:
            self.optim = "adamw_torch"  # what the parent validates; restored below
        super().__post_init__()
        if ours:
            self.optim = GRADSPACE_OPTIM


class GradspaceTrainer(Trainer):
    """A ``Trainer`` that builds a gradspace optimizer itself, from its own (possibly per-trial) arguments.

    ``GradspaceTrainer(model=..., args=..., method="galore", target_modules=..., layerwise=False,
    optim_options={"rank": 128})``: for ``model_init`` and FSDP, where ``optimizers=(opt, None)`` is refused.
    ``args.optim`` is honoured: the Trainer's GaLore names (``galore_adamw``, ``galore_adamw_8bit``,
    ``galore_adafactor`` and their ``_layerwise`` forms) map to gradspace's ``galore`` with that rule, its APOLLO
    names (``apollo_adamw``, ``apollo_adamw_layerwise``) to ``apollo`` (``optim_args`` ``proj=random|svd``,
    ``scale_type``, ``scale`` as the Trainer passes them) and, as in the Trainer, need ``optim_target_modules``
    (or ``target_modules=`` here); at its default (``adamw_torch``), or ``"gradspace"``
    (``GradspaceTrainingArguments``), ``method`` or ``optim_args``' ``method=`` decides (GaLore if neither); any
    other value is an error. It honours an overridden
    ``get_decay_parameter_names``.
    """

    def __init__(self, *args, method=None, target_modules=None, layerwise=False, optim_options=None, **kwargs):
        self.gradspace = {
            "method": method,
            "target_modules": target_modules,
            "layerwise": layerwise,
            "options": dict(optim_options or {}),
        }
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None and getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "GradspaceTrainer does not run under FSDP yet: Accelerate's FSDP saves and loads the optimizer "
                "state by parameter shards, which does not fit gradspace's per-weight bases and projected moments. "
                "Train with DDP (torchrun/accelerate without an FSDP config; layer-wise needs one process here), or "
                "use `torchrun ... gradspace pretrain --fsdp` / `gradspace finetune --fsdp`, which run FSDP2"
            )
        if self.optimizer is None:
            model = self.model if model is None else model
            g = self.gradspace
            require_trainer_targets(self.args.optim, g["target_modules"], self.args)
            method, layerwise, options = resolve_trainer_optim(
                self.args.optim, g["method"], g["layerwise"], g["options"]
            )
            self.optimizer = _build(
                model,
                self.args,
                method,
                g["target_modules"],
                None,
                layerwise,
                options,
                set(self.get_decay_parameter_names(model)),
            )
        return self.optimizer
