"""SubspaceOptimizer: one ``torch.optim.Optimizer`` that composes a tracker, a moment policy and an inner rule.

Param groups follow galore-torch / Hugging Face: a group with a ``rank`` key is projected (its 2-D weights run the
inner rule in a rank-r subspace), every other group runs the same inner rule in full rank.

    groups = [{"params": lin_weights, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
              {"params": other_params}]
    opt = SubspaceOptimizer(groups, lr=1e-3, weight_decay=0.01)          # GaLore-AdamW
"""

from __future__ import annotations

import difflib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from . import basis_storage, batched, recovery, rounding, validation
from . import distributed as dist_support
from . import moments as moment_policies
from . import update as outputs
from .components import LIKE_GRAD, TrackerState, part
from .energy import captured_energy, inverse_gram
from .int8_weights import is_int8
from .projection import PROJ_TYPES, basis_on_right, largest_principal_angle, oriented, project
from .recovery import RECOVERY_DEFAULTS
from .rules import RULES, get_rule
from .trackers import TRACKERS, Context, get_tracker
from .trackers.base import orthonormalize, seeded_generator

log = logging.getLogger(__name__)

NONFINITE_MODES = ("error", "skip", "off")

#: group keys that only projected groups (those with "rank") carry
PROJECTION_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "tracker": "svd",
    "moments": "keep",
    "recovery": False,
    "transposed": False,  # weights stored (in, out), as transformers' Conv1D: projected as their transpose
    **RECOVERY_DEFAULTS,
    **outputs.OUTPUT_DEFAULTS,
    "update_stagger": False,  # each weight refreshes at its own phase of the period (docs/methods.md)
    "basis_dtype": "float32",  # how the basis is stored between steps (gradspace.basis_storage)
}
#: projected-group keys that may also be given as optimizer options, whatever the tracker and rule
GROUP_OPTIONS = {*RECOVERY_DEFAULTS, *outputs.OUTPUT_DEFAULTS, "update_stagger", "basis_dtype"}
#: structural keys of the optimizer itself (each tracker and rule adds its own ``structural`` options)
STRUCTURAL_KEYS = (
    *("tracker", "moments", "recovery", "basis_dtype", "base", "rank", "proj_type", "transposed", "state_dtype"),
)
#: state entries of the optimizer itself: step counter, refresh count, stagger phase, the stored basis (the
#: components' entries are nested under their owner: ``gradspace.components.PARTS``)
CORE_STATE_KEYS = ("step", "updates", "phase", *basis_storage.STATE_KEYS)


def option_owners() -> dict[str, list[str]]:
    """Every option -> who declares it (``"inner rule adamw"``, ``"tracker svd"``, ``"the optimizer"``), from the
    registries as they are now (a component registered later is included)."""
    owners = {k: ["the optimizer"] for k in ("lr", "weight_decay", "state_dtype", *PROJECTION_DEFAULTS)}
    for kind, table in (("inner rule", RULES), ("tracker", TRACKERS)):
        for name, component in table.items():
            for key in component.defaults:
                owners.setdefault(key, []).append(f"{kind} {name}")
    return owners


def route_options(options: dict[str, Any], base: str, tracker: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rule options, projection options)``: each option goes to the chosen rule or tracker that declares it, or
    to the optimizer's projected groups (``GROUP_OPTIONS``). Any other is an error that names its owner (``eta``
    with GaLore: tracker subtrack, grasswalk) or, for a misspelling, the closest option and its owner."""
    rule, own_tracker = get_rule(base), get_tracker(tracker)
    rule_options, projection = {}, {}
    for key, value in options.items():
        if key in rule.defaults or key == "state_dtype":
            rule_options[key] = value
        elif key in own_tracker.defaults or key in GROUP_OPTIONS:
            projection[key] = value
        else:
            raise ValueError(_misplaced(key, base, tracker))
    return rule_options, projection


def _misplaced(key: str, base: str, tracker: str) -> str:
    owners = option_owners()
    if key in owners:
        return (
            f"option {key!r} does not apply to inner rule {base!r} with tracker {tracker!r}; "
            f"it belongs to {', '.join(owners[key])}"
        )
    close = next(iter(difflib.get_close_matches(key, owners, 1, 0.6)), None)
    if close is not None:
        return f"unknown option {key!r}: did you mean {close!r} (an option of {', '.join(owners[close])})?"
    own = sorted({*get_rule(base).defaults, *get_tracker(tracker).defaults, *GROUP_OPTIONS, "state_dtype"})
    return f"unknown option {key!r}; inner rule {base!r} with tracker {tracker!r} take {', '.join(own)}"


class SubspaceOptimizer(Optimizer):
    """Low-rank subspace optimizer. See the module docstring and docs/methods.md.

    Args:
        params: parameters or param groups; groups with ``rank`` are projected.
        lr, weight_decay: as in AdamW; decay is decoupled and applied in full space after the update.
        base: inner rule name (``adamw`` ...); its hyperparameters (``betas``, ``eps`` ...) go in ``options``.
        tracker, moments, recovery, update_proj_gap, scale, proj_type: defaults for projected groups.
        seed: seeds the random trackers (per parameter and update; no global RNG is used).
        nonfinite: ``"error"`` raises before anything is modified if a gradient has inf/NaN; ``"skip"`` skips the
            whole step and counts it in ``diagnostics()["skipped_steps"]``; ``"off"`` does not check.
        diagnostics: compute captured energy every step (one extra read of each projected gradient).
        distributed: ``None``/``"replicate"`` (every rank computes every subspace update) or ``"shard_updates"``
            (each update computed by one rank of ``process_group`` and broadcast); see ``gradspace.distributed``.
        batched: step projected weights of one shape and settings together on steps without a subspace update
            (the inner rule over ``torch._foreach_*``; each weight's projection and write-back stay one kernel
            each): ``gradspace.batched``.
        options: inner-rule and tracker hyperparameters (e.g. ``betas=(0.9, 0.95)``, ``eta=0.1``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        *,
        weight_decay: float = 0.0,
        base: str = "adamw",
        tracker: str = "svd",
        moments: str = "keep",
        recovery: bool = False,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        seed: int = 0,
        nonfinite: str = "error",
        diagnostics: bool = True,
        distributed: str | None = None,
        process_group: Any = None,
        weight_rounding: str = "auto",
        batched: bool = False,
        **options: Any,
    ):
        validation.check_lr_and_decay(lr, weight_decay)
        if weight_rounding not in rounding.ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {', '.join(rounding.ROUNDINGS)}, got {weight_rounding!r}")
        if weight_rounding == "stochastic" and distributed is not None:
            raise ValueError("weight_rounding='stochastic' is not supported with distributed='shard_updates' yet")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {nonfinite!r}")
        rule_options, projection_options = route_options(options, base, tracker)
        self._proj_defaults = dict(PROJECTION_DEFAULTS)
        self._proj_defaults.update(
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            tracker=tracker,
            moments=moments,
            recovery=recovery,
        )
        self._proj_defaults.update(projection_options)
        # the rule's hyperparameters are defaults, as torch.optim.AdamW's betas are: LR schedulers that cycle
        # momentum (OneCycleLR, CyclicLR) look for "betas" or "momentum" there, then rewrite every group's each step
        self._rule_options = rule_options
        defaults = {"lr": lr, "weight_decay": weight_decay, "base": base, "state_dtype": None}
        defaults.update({**get_rule(base).defaults, **self._rule_options})
        get_rule(base).validate(defaults)  # before the params, as torch.optim does
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.weight_rounding = weight_rounding
        self.collect_diagnostics = diagnostics
        if type(batched) is not bool:
            raise ValueError(f"batched must be True or False, got {batched!r}")
        self.batched = batched
        self.distributed = dist_support.check_mode(distributed)
        self.process_group = process_group
        self._new_bases: dict[torch.Tensor, torch.Tensor] | None = None
        self.skipped_steps = 0
        self._step_seconds = 0.0
        self._clipped: list[str] = []
        self._diag: dict[torch.Tensor, dict[str, Any]] = {}
        self._index: dict[torch.Tensor, int] | None = None
        self._shapes: dict[torch.Tensor, tuple[int, ...]] = {}
        self._building = True  # one warning for all the clipped weights of the constructor's groups
        super().__init__(params, defaults)
        self._building = False
        self.register_state_dict_post_hook(validation.add_gradspace_state, prepend=True)
        self._warn_clipped()

    def _warn_clipped(self) -> None:
        if self._clipped:
            log.warning(
                "rank >= min(m, n) for %d weight(s) (%s): they are trained in full rank, without projection",
                len(self._clipped),
                ", ".join(self._clipped[:5]) + (" ..." if len(self._clipped) > 5 else ""),
            )
            self._clipped = []

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, with gradspace's defaults and checks; a rejected group leaves the optimizer as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if not isinstance(params, set):  # a generator would be consumed by validation (torch rejects sets itself)
            params, names = validation.split_named([params] if isinstance(params, torch.Tensor) else list(params))
            group["params"] = params
            if names is not None:
                group["param_names"] = names
        self._check_group_keys(group)
        if "rank" in group:
            for key, value in self._proj_defaults.items():
                group.setdefault(key, value)
            for key, value in get_tracker(group["tracker"]).defaults.items():
                group.setdefault(key, value)
        rule = get_rule(group.get("base", self.defaults.get("base", "adamw")))
        # a group with its own rule takes that rule's defaults where the user gave the optimizer none
        inherited = self.defaults if rule.name == self.defaults.get("base") else self._rule_options
        for key, value in rule.defaults.items():
            group.setdefault(key, inherited.get(key, value))
        clipped = self._validate_group(group, rule)
        self._name_like_the_others(group)
        super().add_param_group(group)
        self._index = None
        self._clipped += clipped
        if not self._building:
            self._warn_clipped()

    def _name_like_the_others(self, group: dict) -> None:
        """torch needs every group named or none: a group of plain tensors added to an optimizer built from named
        parameters (``create_optimizer`` names them) gets the names diagnostics give unnamed weights."""
        if not self.param_groups:
            return
        named = "param_names" in self.param_groups[0]
        if named and "param_names" not in group:
            start = sum(len(g["params"]) for g in self.param_groups)
            group["param_names"] = [f"param{start + i}" for i in range(len(group["params"]))]
        elif not named and "param_names" in group:
            raise ValueError(  # torch's words first: its generic optimizer tests match them
                "all optimizer param groups should be with/without names. cannot add param group with names to the "
                "optimizer: its other groups have none, so pass this group's tensors without names"
            )

    def _check_group_keys(self, group: dict) -> None:
        """A near-miss of a known key (``updte_proj_gap``, ``projection_type``) is an error naming the intended
        key; any other key is kept, as torch keeps it."""
        known = {"params", "param_names", "rank", *self.defaults, *option_owners()}
        for key in group:
            if key in known or key in validation.FOREIGN_GROUP_KEYS or not isinstance(key, str):
                continue
            close = validation.GROUP_KEY_ALIASES.get(key) or next(
                iter(difflib.get_close_matches(key, known, 1, 0.8)), None
            )
            if close is not None:
                raise ValueError(f"unknown param-group key {key!r}: did you mean {close!r}?")

    def _validate_group(self, group: dict, rule) -> list[str]:
        """Every check of a new group, before anything is stored; returns the weights trained in full rank because
        the rank is not below their smaller side."""
        validation.check_lr_and_decay(
            group.get("lr", self.defaults["lr"]), group.get("weight_decay", self.defaults["weight_decay"])
        )
        dtype = group.get("state_dtype", self.defaults.get("state_dtype"))
        if dtype is not None:
            resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
            if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
                raise ValueError(f"state_dtype must be None or a floating-point dtype (e.g. 'float32'), got {dtype!r}")
        rule.validate(group)
        params = group["params"]
        names = group.get("param_names") or [None] * len(params)
        for i, (p, name) in enumerate(zip(params, names)):
            label = name or f"param {i} of param group {len(self.param_groups)} (shape {tuple(p.shape)})"
            validation.check_real(p, label)
            dist_support.check_param(p, label, rule.name)
        if "rank" not in group:
            return []
        rank, gap = group["rank"], group["update_proj_gap"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
            raise ValueError(f"update_proj_gap must be a positive integer, got {gap!r}")
        if group["proj_type"] not in PROJ_TYPES or group["proj_type"] == "full":
            raise ValueError(
                f"unknown proj_type {group['proj_type']!r}; choose one of std, reverse_std, left, right "
                "(two-sided 'full' is not supported)"
            )
        if not float(group["scale"]) > 0.0:
            raise ValueError(f"scale must be > 0, got {group['scale']}")
        tracker = get_tracker(group["tracker"])
        tracker.validate(group)
        moment_policies.validate_policy(group["moments"])
        if type(group["recovery"]) is not bool:
            raise ValueError(f"recovery must be True or False, got {group['recovery']!r}")
        if type(group["update_stagger"]) is not bool:
            raise ValueError(f"update_stagger must be True or False, got {group['update_stagger']!r}")
        basis_storage.validate(group, trains_basis=tracker.moves_every_step)
        if group["update_stagger"] and not tracker.periodic:
            raise ValueError(
                f"update_stagger shifts the phase of a refresh every update_proj_gap steps; tracker "
                f"{group['tracker']!r} has its own schedule (adarank: adaptive; online_pca: every step)"
            )
        recovery.validate(group)
        outputs.validate(group)
        if not tracker.orthonormal and group["moments"] in ("rotate", "project"):
            raise ValueError(
                f"moment policy {group['moments']!r} transports the moments with C = S_new^T S_old, which needs an "
                f"orthonormal basis; tracker {group['tracker']!r} keeps a non-orthonormal one: use 'keep' or 'reset'"
            )
        clipped = []
        for i, (p, name) in enumerate(zip(params, names)):
            label = name or f"param {i} of param group {len(self.param_groups)}"
            if p.dim() != 2:
                raise ValueError(dist_support.flattened_message(label, tuple(p.shape)))
            if rank >= min(p.shape):
                clipped.append(f"{label} {tuple(p.shape)}")
        return clipped

    # ------------------------------------------------------------------ per parameter (layer-wise, distributed)
    def group_of(self, p: torch.Tensor) -> dict:
        """The param group that holds ``p``."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"parameter of shape {tuple(p.shape)} is not in this optimizer")

    def layout(self, p: torch.Tensor, group: dict | None = None) -> tuple[bool, int] | None:
        """(basis on the right, rank) for a projected weight, None for a parameter trained in full rank."""
        group = self.group_of(p) if group is None else group
        if "rank" not in group:
            return None
        if p.dim() != 2:  # flattened after the optimizer was built (FSDP1, ZeRO): never fall back to full rank
            raise RuntimeError(dist_support.flattened_message(self._name(group, p), tuple(p.shape)))
        if group["rank"] >= min(p.shape):
            return None
        if group.get("transposed"):  # stored (in, out) like transformers' Conv1D: project it as its (out, in) transpose
            return not basis_on_right(tuple(p.shape[::-1]), group["proj_type"]), group["rank"]
        return basis_on_right(tuple(p.shape), group["proj_type"]), group["rank"]

    def param_index(self, p: torch.Tensor) -> int:
        """``p``'s position in the optimizer (over all groups): what seeds its random draws and orders its work."""
        if self._index is None:
            self._index = {q: i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return self._index[p]

    def basis_due(self, p: torch.Tensor, group: dict | None = None) -> bool:
        """Whether ``p``'s basis moves before its next step (read before that step, with ``p.grad`` set): False
        for a full-rank parameter and before its first basis."""
        group = self.group_of(p) if group is None else group
        layout, state = self.layout(p, group), self.state.get(p)
        if layout is None or not state or "basis" not in state:
            return False
        tracker = get_tracker(group["tracker"])
        return tracker.due(oriented(dist_support.local(p.grad), layout[0]), TrackerState(state), group)

    def compute_basis(self, p: torch.Tensor, grad: torch.Tensor, group: dict | None = None) -> torch.Tensor:
        """The basis ``p`` moves to at this step (float32, row-major), from its full gradient ``grad`` in ``p``'s
        layout, without taking it: ``distributed="shard_updates"`` computes it on one rank and hands every rank's
        copy to ``step`` (which then runs the moment policy and the tracker's ``on_update``). Timed."""
        group = self.group_of(p) if group is None else group
        right = self.layout(p, group)[0]
        state = self.state[p]
        t0 = time.perf_counter()
        with basis_storage.unpacked(state, group):
            tracker = get_tracker(group["tracker"])
            new = tracker.update(oriented(grad, right), TrackerState(state), group, self._context(p, right, group))
        self._diag_of(p)["update_seconds"] += time.perf_counter() - t0
        return new.float().contiguous()

    def projected_gradient(self, p: torch.Tensor, group: dict | None = None) -> torch.Tensor | None:
        """``p.grad`` projected on ``p``'s current basis (r x l, oriented), which layer-wise accumulation may keep
        instead of the gradient between subspace updates; None when the full gradient must be kept: a full-rank
        parameter, no basis yet, an FSDP2 shard, a tracker that reads every gradient, an output that reads the
        full gradient, or a basis due to move at the coming step."""
        group = self.group_of(p) if group is None else group
        layout, state = self.layout(p, group), self.state.get(p)
        if layout is None or not state or "basis" not in state or dist_support.is_dtensor(p):
            return None
        if outputs.needs_full_gradient(group) or get_tracker(group["tracker"]).needs_every_gradient:
            return None
        if self.basis_due(p, group):
            return None
        return project(basis_storage.load(state), oriented(p.grad, layout[0]))

    def structural_keys(self, group: dict) -> tuple[str, ...]:
        """The group keys a checkpoint must agree on: the optimizer's own, then the tracker's and the rule's."""
        tracker = get_tracker(group["tracker"]).structural if "rank" in group else ()
        return (*STRUCTURAL_KEYS, *tracker, *get_rule(group["base"]).structural)

    def state_keys(self, group: dict) -> dict[str, Any]:
        """Every state entry a parameter of ``group`` may hold -> ``LIKE_GRAD`` or None, nested as the state is
        (``gradspace.components``): the optimizer's own at the top, then ``"rule"`` (the inner rule's declared
        keys) and, if projected, ``"tracker"`` and ``"output"`` (the limiter's norm)."""
        keys: dict[str, Any] = dict.fromkeys(CORE_STATE_KEYS)
        keys["rule"] = dict(get_rule(group["base"]).state_keys)
        if "rank" in group:
            keys["tracker"] = dict(get_tracker(group["tracker"]).state_keys)
            keys["output"] = dict.fromkeys(recovery.STATE_KEYS)
        return keys

    def state_shard_dim(self, p: torch.Tensor, key: str) -> int | None:
        """Under FSDP2, the dimension along which this rank holds only its part of ``p``'s state entry ``key`` (a
        dotted name, ``"rule.exp_avg"``: ``gradspace.components.flat_items``); None when every rank holds all of
        it (bases, tracker state, moments of gathered weights), which a checkpoint then stores once. Only the inner
        rule's ``LIKE_GRAD`` entries are sharded: like the weight (dim 0) for a full-rank weight, along the rows
        (dim 1 of the oriented r x rows frame) for a weight stepped on its rows."""
        if not dist_support.is_dtensor(p):
            return None
        group = self.group_of(p)
        owner, _, name = key.partition(".")
        if owner != "rule" or get_rule(group["base"]).state_keys.get(name) != LIKE_GRAD:
            return None
        layout = self.layout(p, group)
        if layout is None:
            return 0
        return 1 if dist_support.steps_on_shard(p, layout[0], outputs.needs_full_gradient(group)) else None

    def _diag_of(self, p: torch.Tensor) -> dict[str, Any]:
        return self._diag.setdefault(p, {"update_seconds": 0.0, "angle": None})

    def _name(self, group: dict, p: torch.Tensor) -> str:
        names = group.get("param_names")
        i = next(i for i, q in enumerate(group["params"]) if q is p)
        if names:
            return names[i]
        return f"param {i} of group {self.param_groups.index(group)} (shape {tuple(p.shape)})"

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not self._check_grads(work):
            return loss
        # distributed="shard_updates": this step's new bases, each computed by one rank (gradspace.distributed)
        self._new_bases = dist_support.shard_updates(self, work, self.process_group) if self.distributed else None
        full_rank: dict[int, list[torch.Tensor]] = {}
        batches: dict[tuple, tuple[dict, list[torch.Tensor]]] = {}
        for group, p in work:
            if self.layout(p, group) is None:  # batched per group: rules may run one fused kernel over them
                full_rank.setdefault(id(group), []).append(p)
            elif self.batched and (key := batched.key(self, group, p)) is not None:
                batches.setdefault(key, (group, []))[1].append(p)
            else:
                self._step_param(group, p)
        for key, (group, params) in batches.items():
            t0 = time.perf_counter()
            batched.step(self, group, params, right=key[4])
            self._step_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        for group in self.param_groups:
            if id(group) in full_rank:
                self._step_full_rank(group, full_rank[id(group)])
        self._step_seconds += time.perf_counter() - t0
        return loss

    def _check_grads(self, work) -> bool:
        """Validate every gradient before any state or weight changes. False means: skip this step."""
        for group, p in work:
            if p.grad.is_sparse:
                raise RuntimeError(f"{self._name(group, p)} has a sparse gradient; SubspaceOptimizer needs dense ones")
            self._check_shape(group, p)
        if self.nonfinite == "off" or not work:
            return True
        # one fast reduction per gradient (a sum is 10x cheaper than an inf-norm on CPU); inf/NaN make it
        # non-finite, and the exact check below runs only then (a finite sum overflowing is not an error)
        # (an FSDP2 shard checks its own rows; all ranks then agree through one all-reduce)
        local = dist_support.local
        if all(p.grad.is_cuda for _, p in work):  # one multi-tensor kernel per dtype instead of one per gradient
            sums = torch.stack(torch._foreach_norm([local(p.grad) for _, p in work])).float()
        else:
            sums = torch.stack([local(p.grad).sum(dtype=torch.float32) for _, p in work])
        bad = None
        if not bool(sums.isfinite().all()):
            bad = next(((g, p) for g, p in work if not bool(local(p.grad).isfinite().all())), None)
        if dist_support.all_finite(bad is None, (p for _, p in work)):
            return True
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return False
        where = self._name(*bad) if bad is not None else "a parameter shard on another rank"
        raise FloatingPointError(
            f"non-finite gradient (inf or NaN) in {where}; nothing was updated. Lower the learning "
            "rate, use loss scaling, or pass nonfinite='skip' to skip such steps"
        )

    def _check_shape(self, group: dict, p: torch.Tensor) -> None:
        """A parameter resized after its state was made (``p.data = ...``) would corrupt memory in the fused kernels
        or silently shrink the state: stop with an error instead. Shapes are recorded on a parameter's first step
        (or first step after a load, whose shapes ``load_state_dict`` has checked against the saved state)."""
        shape = tuple(p.shape)
        if tuple(p.grad.shape) != shape:
            raise RuntimeError(
                f"{self._name(group, p)} has shape {shape} but its gradient has shape {tuple(p.grad.shape)}"
            )
        known = self._shapes.setdefault(p, shape)
        if known != shape:
            raise RuntimeError(
                f"{self._name(group, p)} changed shape from {known} to {shape} after the optimizer made its state; "
                "build a new optimizer (or add the resized tensor as a new parameter) after changing a model's shapes"
            )

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, projected_grad: torch.Tensor | None = None, group: dict | None = None):
        """Step one parameter now (layer-wise mode calls this from a post-accumulate-grad hook).

        ``projected_grad`` is a gradient already projected onto the current basis (r x l, oriented), summed over
        micro-batches; it is added to the projection of ``p.grad``. Only valid when the basis is not due to move.
        """
        group = group if group is not None else self.group_of(p)
        self._new_bases = None  # bases move here as without distributed="shard_updates"
        work = [(group, p)]
        if not self._check_grads(work):
            return
        if projected_grad is not None and not bool(projected_grad.isfinite().all()) and self.nonfinite != "off":
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                return
            raise FloatingPointError(f"non-finite accumulated gradient in {self._name(group, p)}; nothing was updated")
        self._step_param(group, p, projected_grad)

    def seconds(self) -> dict[str, float]:
        """Running totals since the optimizer was built: ``optimizer_time``, the seconds stepping weights (projection,
        inner rule, write-back, subspace updates; inside backward under ``Layerwise``), and ``subspace_update_time``,
        the part in subspace updates (``gradspace.train.loop`` reports both per step)."""
        updates = sum(d.get("update_seconds", 0.0) for d in self._diag.values())
        return {"optimizer_time": self._step_seconds, "subspace_update_time": updates}

    def _step_param(self, group: dict, p: torch.Tensor, projected_grad: torch.Tensor | None = None) -> None:
        t0 = time.perf_counter()
        try:
            self._step_param_now(group, p, projected_grad)
        finally:
            self._step_seconds += time.perf_counter() - t0

    def _step_param_now(self, group: dict, p: torch.Tensor, projected_grad: torch.Tensor | None = None) -> None:
        layout = self.layout(p, group)
        if layout is None:
            self._step_full_rank(group, [p])
            return
        with self._float32_step(group, p) if self._rounds(p) else nullcontext():
            state = self.state[p]
            self._step_projected(group, p, state, get_rule(group["base"]), *layout, projected_grad)
            state["step"] += 1
            self._decay(group, [p])

    def _step_full_rank(self, group: dict, params: list[torch.Tensor]) -> None:
        rounded = [p for p in params if self._rounds(p)]
        if rounded:  # each on its float32 copy, the others batched as usual
            for p in rounded:
                with self._float32_step(group, p):
                    self._step_full_rank_now(group, [p])
            params = [p for p in params if not self._rounds(p)]
            if not params:
                return
        self._step_full_rank_now(group, params)

    def _rounds(self, p: torch.Tensor) -> bool:
        """Whether ``p`` steps on a float32 copy written back at the end: an int8 weight always, a bfloat16 one
        with stochastic rounding."""
        if is_int8(p):
            return True
        return self.weight_rounding == "stochastic" and p.dtype == torch.bfloat16 and not dist_support.is_dtensor(p)

    def _rounding_generator(self, p: torch.Tensor) -> torch.Generator:
        draw = int(self.state[p].get("step", 0))
        return seeded_generator(Context(self.param_index(p), False, self.seed), draw, p.device, "rounding")

    @contextmanager
    def _float32_step(self, group: dict, p: torch.Tensor):
        """Step ``p`` (bfloat16 or int8) on a float32 copy, its state still made in the weight's dtype (an int8
        weight's: its compute dtype), then write the copy back with stochastic rounding (``gradspace.rounding``;
        an int8 weight stochastically unless ``weight_rounding="nearest"``, ``gradspace.int8_weights``)."""
        if is_int8(p):
            kept = group.get("state_dtype")
            if kept is None:
                group["state_dtype"] = p.dtype
            try:
                with p.updating(None if self.weight_rounding == "nearest" else lambda: self._rounding_generator(p)):
                    yield
            finally:
                group["state_dtype"] = kept
            return
        low, kept = p.data, group.get("state_dtype")
        p.data = low.float()
        if kept is None:
            group["state_dtype"] = low.dtype  # the moments keep the weight's dtype, as without rounding
        try:
            yield
            rounding.stochastic_round_(low, p.data, self._rounding_generator(p))
        finally:
            group["state_dtype"] = kept
            p.data = low

    def _step_full_rank_now(self, group: dict, params: list[torch.Tensor]) -> None:
        rule = get_rule(group["base"])
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                rule.init_state(part(state, "rule"), p, group)
        rule.step_full_rank(params, [part(state, "rule") for state in states], group)
        for state in states:
            state["step"] += 1
        self._decay(group, params)

    @staticmethod
    def _decay(group: dict, params: list[torch.Tensor]) -> None:
        """Decoupled weight decay, after the update (galore-torch's order)."""
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-float(group["lr"]) * group["weight_decay"])

    def _context(self, p: torch.Tensor, right: bool, group: dict) -> Context:
        """``right`` in the layout of the weight as a linear map (out, in): a Conv1D weight's SVD is then taken of
        the same matrix as its ``nn.Linear`` twin's, with the same singular-vector signs."""
        return Context(index=self.param_index(p), right=right != bool(group.get("transposed")), seed=self.seed)

    def _refresh_basis(self, group, p, state, rule, tracker, ctx, gn, full, rank: int, diag: dict) -> None:
        """The first basis on a weight's first step; later, the tracker's move when it is due (or the basis that
        another rank computed, under distributed="shard_updates"), with the moment policy applied. Timed."""
        new = None if self._new_bases is None else self._new_bases.pop(p, None)  # distributed="shard_updates"
        own, rule_state = TrackerState(state), part(state, "rule")
        if "basis" not in state:
            state["step"] = 0
            state["updates"] = 0
            if group["update_stagger"]:  # kept in the state: a resumed run keeps every weight's phase
                state["phase"] = ctx.index % group["update_proj_gap"]
            t0 = time.perf_counter()
            state["basis"] = tracker.init(full(), rank, own, group, ctx)
            if self.distributed == "shard_updates":  # computed everywhere once; the owner's bits for all
                world = torch.distributed.get_world_size(self.process_group)
                state["basis"] = dist_support.broadcast_basis(state["basis"], ctx.index % world, self.process_group)
            diag["update_seconds"] += time.perf_counter() - t0
            rule.init_state(rule_state, rule.template(state["basis"].shape[1], gn.shape[1], p), group)
        elif new is not None or (self._new_bases is None and tracker.due(gn, own, group)):
            t0 = time.perf_counter()
            old = state["basis"]
            if new is None:
                new = tracker.update(full(), own, group, ctx)
            tracker.on_update(own, group)
            like = rule.template(new.shape[1], gn.shape[1], p, rule_state)
            moment_policies.apply_policy(group["moments"], rule, rule_state, old, new, like, group)
            state["basis"] = new
            state["updates"] += 1
            diag["update_seconds"] += time.perf_counter() - t0
            if self.collect_diagnostics:
                if not tracker.orthonormal:
                    old, new = orthonormalize(old), orthonormalize(new)
                diag["angle"] = largest_principal_angle(old, new)

    def _step_projected(self, group, p, state, rule, right: bool, rank: int, extra=None) -> None:
        with basis_storage.unpacked(state, group):  # float32 for this step, whatever basis_dtype stores
            self._step_unpacked(group, p, state, rule, right, rank, extra)

    def _step_unpacked(self, group, p, state, rule, right: bool, rank: int, extra=None) -> None:
        tracker = get_tracker(group["tracker"])
        ctx = self._context(p, right, group)
        # gn is what is projected: the gradient, or under FSDP2 this rank's rows or the gathered full gradient;
        # full() is the full gradient the tracker reads (the same tensor unless gn is a shard)
        view = dist_support.param_view(p, right, gather=outputs.needs_full_gradient(group))
        gn = oriented(view.grad, right)

        def full() -> torch.Tensor:
            return oriented(view.full_grad(), right)

        diag = self._diag_of(p)
        self._refresh_basis(group, p, state, rule, tracker, ctx, gn, full, rank, diag)
        basis = state["basis"]
        gt = project(basis, gn)
        if extra is not None:  # layer-wise accumulation: earlier micro-batches, already projected
            gt.add_(extra)
        tgn, tgt = gn, gt
        if view.local and tracker.needs_every_gradient:
            tgn = full()
            tgt = project(basis, tgn)
        own = TrackerState(state)
        tracker.observe(tgn, tgt, own, group)
        if self.collect_diagnostics and extra is None:
            diag["energy"] = captured_energy(basis, gn, gt, None if tracker.orthonormal else inverse_gram(basis, diag))
        direction, factor = rule.update(gt, part(state, "rule"), group)
        outputs.apply_update(
            view.weight,
            basis,
            gn,
            gt,
            direction,
            part(state, "output"),
            group,
            right=right,
            step_size=-float(group["lr"]) * factor,
            orthonormal=tracker.orthonormal,
            rows=view.rows,
        )
        t0 = time.perf_counter()
        tracker.after_step(tgn, own, group, ctx)
        if tracker.moves_every_step:  # its per-step basis move is its subspace update
            diag["update_seconds"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ checkpoints
    _PICKLED = (
        "_proj_defaults",
        "_rule_options",
        "seed",
        "nonfinite",
        "collect_diagnostics",
        "skipped_steps",
        "distributed",
        "batched",
    )

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: torch.optim keeps only defaults, state, groups
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._PICKLED}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._clipped, self._diag, self._index, self._shapes, self._new_bases = [], {}, None, {}, None
        self._step_seconds = 0.0
        self._building = False
        if not hasattr(self, "_rule_options"):  # pickled by a version that kept only the given options as defaults
            self._rule_options = {k: v for k, v in self.defaults.items() if k not in ("lr", "weight_decay", "base")}
        if not hasattr(self, "process_group"):  # unpickled or deep-copied: a process group does not travel
            self.process_group = None
            self.distributed = state.get("distributed")
        if validation.add_gradspace_state not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(validation.add_gradspace_state, prepend=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's contract (pre-hooks may change the dict before it is checked, non-parameter state keys are kept,
        post-hooks run last), with two differences. State is loaded without torch's cast to the param dtype, so a
        float32 basis or float32 moments of a bf16 parameter come back as saved and a resumed run equals the
        uninterrupted one. And a state saved with another method, tracker, inner rule, rank or model is refused
        with an error instead of silently replacing this optimizer's configuration."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        extra = state_dict.get("gradspace", {})
        validation.check_state_format(extra, state_dict["state"])
        groups, saved_groups = self.param_groups, deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups but this optimizer has {len(groups)}; "
                "it was saved for a different model or parameter selection"
            )
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict has {len(saved['params'])} parameters in group {i} but this optimizer has "
                    f"{len(group['params'])}; it was saved for a different model or parameter selection"
                )
            validation.check_same_configuration(i, group, saved, self.structural_keys(group))
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups), chain.from_iterable(g["params"] for g in groups)
            )
        )
        keys_of = {p: self.state_keys(g) for g in groups for p in g["params"]}
        rule_of = {p: get_rule(g["base"]) for g in groups for p in g["params"]}
        state: defaultdict[Any, dict] = defaultdict(dict)
        for key, st in state_dict["state"].items():
            if key not in id_map:  # state not tied to a parameter: kept as it is, as torch does
                state[key] = st
                continue
            p = id_map[key]
            validation.check_saved_state(p, st, rule_of[p], keys_of[p])
            state[p] = _on_device(st, p.device)
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            for key, value in group.items():  # keys added since the checkpoint was written keep this run's value
                saved.setdefault(key, value)
        self.__setstate__({"state": state, "param_groups": saved_groups})
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.seed = int(extra.get("seed", self.seed))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ------------------------------------------------------------------ reporting
    def diagnostics(self) -> dict[str, Any]:
        """Per projected weight: rank, captured energy ``||Gt||^2/||G||^2``, principal angle moved at the last update
        (radians), update count, seconds spent in subspace updates, state bytes; plus totals."""
        per_weight: dict[str, dict[str, Any]] = {}
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st or "basis" not in st:
                    continue
                names = group.get("param_names")
                name = names[i] if names else f"param{self.param_index(p)}"
                d = self._diag.get(p, {})
                tracker = get_tracker(group["tracker"])
                per_weight[name] = {
                    "shape": tuple(p.shape),
                    "rank": int(basis_storage.basis_shape(st)[1]),
                    "energy": _num(d.get("energy")),
                    "angle": _num(d.get("angle")),
                    "updates": int(st.get("updates", 0)),
                    "update_seconds": float(d.get("update_seconds", 0.0)),
                    "state_bytes": state_bytes(st),
                    **{k: _num(st["tracker"][k]) for k in tracker.diagnostics if k in st.get("tracker", {})},
                }
        return {
            "weights": per_weight,
            "skipped_steps": self.skipped_steps,
            "state_bytes": optimizer_state_bytes(self),
            "update_seconds": sum(w["update_seconds"] for w in per_weight.values()),
        }


def _on_device(state: dict, device: torch.device) -> dict:
    """A copy of a parameter's (nested) saved state with its tensors on ``device``."""
    return {
        k: _on_device(v, device) if isinstance(v, dict) else v.to(device=device) if isinstance(v, torch.Tensor) else v
        for k, v in state.items()
    }


def _num(x):
    if isinstance(x, torch.Tensor):
        return float(x)
    return x


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in one parameter's state, nested parts included."""
    total = 0
    for v in state.values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            total += state_bytes(v)
    return total


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Exact bytes held in an optimizer's state tensors (any torch optimizer)."""
    return sum(state_bytes(st) for st in optimizer.state.values())
