"""The peak memory of a training run, predicted line by line before anything large is built.

Every line says what it counts and from what:

- **baseline**: the process itself (interpreter, torch, transformers), measured once per machine in a fresh
  interpreter (``baseline.py``); 0 on CUDA, where ``max_memory_allocated`` does not count the context;
- **weights**, **gradients** (all held until the step; under layer-wise one at a time, except with accumulation,
  where a window whose basis moves keeps every gradient) and **optimizer state** per component (the inner rule's
  moments, bases and tracker state, full-rank parameters' state), from the byte formulas every component declares
  (``gradspace.bench formula``, checked against counted state);
- **activations**: what the forward keeps for backward, counted on the architecture itself
  (``activations.py``): every layer's, or under gradient checkpointing each layer's input plus the one layer being
  recomputed; plus the loss's backward, the gradients of the float32 log-softmax and logits;
- **step transients**: the largest update's workspace (the full float32 gradient of the largest projected weight
  and its back-projection; an exact SVD's factors where a basis is computed);
- **allocator headroom**: what the allocator keeps beyond the live tensors (a share of them, measured).

The peak is the larger of the backward's (weights, state, activations, loss) and the step's (weights, state,
gradients, transients): activations are freed as gradients appear, so the two do not add up.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..int8_weights import CHUNK

GiB = 2**30
#: what the allocator keeps beyond the live tensors, as a share of them (measured: docs/benchmarks.md)
HEADROOM = 0.03
#: the inner rule's temporaries on a full-rank parameter, bytes per element, and the elements it takes at a time:
#: torch's fused Adam kernel none; the 8-bit rule dequantises m and v chunk by chunk (measured on LLaMA-60M's
#: embedding: 171 MB for a 4 Mi-element chunk); the others one float32 temporary
RULE_WORKSPACE = {"adamw": (0, None), "adamw8bit": (40, 1 << 22)}


@dataclass(frozen=True)
class Setup:
    """A run's options that move its memory (the names of ``gradspace pretrain``'s flags)."""

    method: str = "galore"
    base: str = "adamw"
    rank: int | None = None  #: None: a quarter of the hidden size (the papers' d/4)
    update_gap: int = 200
    dtype: str = "float32"
    layerwise: bool = False
    grad_checkpointing: bool = False
    batch_size: int = 1
    seq_len: int = 256
    grad_accum: int = 1
    svd: str | None = None
    device: str = "cpu"
    world: int = 1  #: data-parallel processes (the figures are per process)
    fsdp: bool = False
    target_modules: Any = None  #: None: attention and MLP linears
    optim_args: dict[str, Any] = field(default_factory=dict)  #: tracker and rule options (basis_dtype=bfloat16 ...)
    weight_rounding: str = "auto"  #: stochastic: each bfloat16 weight steps on a float32 copy (int8 ones always do)


@dataclass(frozen=True)
class Line:
    part: str
    bytes: int
    how: str


@dataclass
class Plan:
    setup: Setup
    lines: list[Line]
    peak: int
    at: str  #: where the peak is: "backward" or "step"

    def line(self, part: str) -> int:
        return sum(x.bytes for x in self.lines if x.part == part)

    def as_dict(self) -> dict[str, Any]:
        return {
            "setup": asdict(self.setup),
            "peak_bytes": self.peak,
            "peak_at": self.at,
            "lines": [asdict(x) for x in self.lines],
        }

    def table(self) -> str:
        width = max(len(x.part) for x in self.lines)
        rows = [f"  {x.part:<{width}}  {x.bytes / GiB:8.3f} GiB  {x.how}" for x in self.lines]
        total = f"  {'predicted peak':<{width}}  {self.peak / GiB:8.3f} GiB  (at the {self.at})"
        return "\n".join([*rows, total])


_selected: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def projected_names(model, s: Setup) -> set[str]:
    """The weights the method projects (none for a full-rank one); remembered, as a search plans one model often."""
    from ..methods import METHODS
    from ..params import DEFAULT_TARGETS, select_params

    if METHODS[s.method] is None:
        return set()
    targets = s.target_modules or DEFAULT_TARGETS
    targets = (targets,) if isinstance(targets, (str, re.Pattern)) else tuple(targets)
    known = _selected.setdefault(model, {})
    if targets not in known:
        known[targets] = {n for g in select_params(model, targets) if "rank" in g for n in g["param_names"]}
    return known[targets]


def _state_lines(model, s: Setup, rank: int) -> tuple[dict[str, int], tuple[int, int]]:
    """Optimizer-state bytes by component, and the largest projected weight's (k, l)."""
    from .. import update as outputs
    from ..bench.formula import weight_bytes
    from ..methods import METHODS
    from ..optimizer import PROJECTION_DEFAULTS
    from ..rules import get_rule
    from ..trackers import get_tracker

    preset = METHODS[s.method]
    options = {**s.optim_args, "base": s.base, "update_proj_gap": s.update_gap}
    projected = set()
    if preset is not None:
        projected = projected_names(model, s)
    parts = {"moments of projected weights": 0, "bases and tracker state": 0, "full-rank parameters' state": 0}
    largest = (0, 0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        elem = _compute(s).itemsize
        if name not in projected or p.dim() != 2 or rank >= min(p.shape):
            parts["full-rank parameters' state"] += weight_bytes(tuple(p.shape), elem, "adamw", math.inf, options)
            continue
        k, l = min(p.shape), max(p.shape)
        largest = max(largest, (k, l), key=lambda kl: kl[0] * kl[1])
        group = {**PROJECTION_DEFAULTS, **preset, **options}
        rule, tracker = get_rule(s.base), get_tracker(group["tracker"])
        group = {**rule.defaults, **tracker.defaults, **group}
        r = min(rank, k)
        moments = rule.state_bytes((r, l), elem, group)
        parts["moments of projected weights"] += moments
        parts["bases and tracker state"] += tracker.state_bytes(k, l, r, group) + outputs.state_bytes(group)
    return parts, largest


def plan_memory(model, setup: Setup | None = None, *, probe: bool = True, **options) -> Plan:
    """The predicted peak of training ``model`` (a Hugging Face causal LM, built on the meta device: nothing is
    allocated) with ``setup`` (or its fields as keywords), per process. ``probe=False`` leaves the activations and the
    baseline out (a lower bound, with nothing run)."""
    from .baseline import process_baseline

    s = replace(setup or Setup(), **options)
    config = model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    from ..methods import preset_projection

    rank = preset_projection(s.method).get("rank", s.rank or max(1, hidden // 4))  # APOLLO-Mini: its own 1
    elem = _compute(s).itemsize
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    shard = s.world if s.fsdp else 1
    int8 = _int8_params(model, s)
    weights = (sum(p.numel() for p in params if id(p) not in int8) * elem + sum(int8.values())) // shard
    grads_all = sum(p.numel() for p in trainable) * elem // shard
    biggest_grad = max(p.numel() for p in trainable) * elem
    held_all = not s.layerwise or s.grad_accum > 1
    grads = grads_all if held_all else biggest_grad
    key = (s.method, s.base, rank, s.dtype, s.update_gap, str(s.target_modules), str(sorted(s.optim_args.items())))
    known = _selected.setdefault(model, {})
    if key not in known:  # the same state for every batch size and checkpointing of a search
        known[key] = _state_lines(model, s, rank)
    state, largest = known[key]
    state = {k: v // shard if "bases" not in k else v for k, v in state.items()}

    acts, acts_how, loss_backward = _activations(model, s, probe)
    step_ws, step_how = _step_workspace(model, s, largest, trainable, int8)
    ddp_buckets = grads_all if s.world > 1 and not s.fsdp and not s.layerwise else 0
    gathered = _fsdp_gathered(model, elem) if s.fsdp and s.world > 1 else 0

    base = process_baseline(s.device) if probe else 0
    fixed = weights + sum(state.values())
    # the backward's dequantised weight (compute dtype), made a chunk at a time through float32
    dequantised = elem * max((p.numel() for p in params if id(p) in int8), default=0) + 8 * CHUNK * bool(int8)
    backward = fixed + acts + loss_backward + gathered + (biggest_grad if not held_all else 0) + dequantised
    step = fixed + grads + ddp_buckets + step_ws + gathered  # FSDP2: backward's end, every shard's gradient held
    live = max(backward, step)
    headroom = int(HEADROOM * live)
    lines = [
        Line("baseline", base, "the process: interpreter, torch, transformers (measured once per machine)"),
        Line("weights", weights, _weights_how(params, int8, elem) + _per(shard)),
        Line(
            "gradients",
            grads,
            "every trainable parameter's, held until the step"
            if held_all
            else "one parameter's at a time (layer-wise), the largest",
        ),
        *(Line(k, v, _state_how(k, s, rank)) for k, v in state.items()),
        Line("activations", acts, f"batch {s.batch_size} x {s.seq_len}: {acts_how}"),
        Line(
            "loss backward", loss_backward, "two float32 batch x sequence x vocabulary gradients (log-softmax, logits)"
        ),
        Line("step transients", step_ws, step_how),
    ]
    if ddp_buckets:
        lines.append(Line("DDP buckets", ddp_buckets, "DDP's gradient buckets beside .grad"))
    if gathered:
        lines.append(
            Line("FSDP2 all-gathered", gathered, "the root's parameters and gradients whole, three blocks' parameters")
        )
    lines.append(Line("allocator headroom", headroom, f"{HEADROOM:.0%} of the live tensors"))
    at = "backward" if backward >= step else "step"
    return Plan(s, lines, base + live + headroom, at)


def _activations(model, s: Setup, probe: bool) -> tuple[int, str, int]:
    """(activations, how, the loss's backward): what the forward keeps, counted by the probe (none without it)."""
    from .activations import saved_activations

    config = model.config
    if not probe:
        return 0, "not counted (a lower bound)", 0
    classifier = not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None
    saved = saved_activations(config, s.batch_size, s.seq_len, _compute(s), classifier)
    layers = next(getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k))
    if s.grad_checkpointing:
        acts = layers * saved.layer_input + saved.per_layer + saved.rest
        how = f"{layers} layer inputs (checkpointing) + one layer recomputed + embeddings, head and loss"
    else:
        acts = layers * saved.per_layer + saved.rest
        how = f"{layers} layers x {saved.per_layer / 2**20:.1f} MiB + embeddings, head and loss"
    return acts, how, 2 * saved.logits  # the log-softmax's and the logits' gradients, at the start of backward


def _step_workspace(model, s: Setup, largest: tuple[int, int], trainable, int8: dict[int, int]) -> tuple[int, str]:
    """The step's largest workspace: the largest projected weight's update (and exact SVD), or the inner rule on
    the largest full-rank parameter, plus stochastic rounding's float32 copy."""
    exact_svd = s.svd != "randomized" and s.method in ("galore", "fira", "subtrack", "subtrack++", "osd")
    k, l = largest
    projected_ws = 2 * k * l * 4 + ((k * k + k * l) * 4 if exact_svd else 0)  # gradient and update; U and Vh
    full_rank = max(
        (p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in projected_names(model, s)),
        default=0,
    )
    per_elem, chunk = RULE_WORKSPACE.get(s.base, (4, None))
    rule_ws = min(full_rank, chunk or full_rank) * per_elem
    if projected_ws >= rule_ws:
        how = "the largest projected weight's float32 gradient and update" + (", and its exact SVD" * exact_svd)
    else:
        how = f"{s.base} on the largest full-rank parameter ({per_elem} B per element" + (
            f", {chunk:,} at a time)" if chunk else ")"
        )
    ws = max(projected_ws, rule_ws)
    if s.weight_rounding == "stochastic" and s.dtype == "bfloat16":  # the float32 copy, the noise, the rounded
        ws += 12 * max(p.numel() for p in trainable)
        how += ", and stochastic rounding's float32 copy"
    if int8:  # the float32 working copy, and quantising it a chunk at a time (about 7 float32 temporaries)
        ws += 4 * max(p.numel() for p in trainable if id(p) in int8) + 28 * CHUNK
        how += ", and the int8 weight's float32 working copy and its quantisation"
    return ws, how


def _compute(s: Setup) -> torch.dtype:
    from ..train.precision import compute_dtype

    return compute_dtype({"dtype": s.dtype}, s.device)


def _int8_params(model, s: Setup) -> dict[int, int]:
    """``{id(parameter): bytes stored}`` of the weights ``--dtype int8`` stores in 8 bits (codes and scales)."""
    if s.dtype != "int8":
        return {}
    from ..int8_weights import DEFAULT_GROUP_SIZE, int8_modules

    out = {}
    for name in int8_modules(model, s.target_modules):
        w = model.get_submodule(name).weight
        rows, cols = w.shape
        groups = cols // DEFAULT_GROUP_SIZE if cols % DEFAULT_GROUP_SIZE == 0 else 1
        out[id(w)] = rows * cols + rows * groups * 4
    return out


def _weights_how(params, int8: dict[int, int], elem: int) -> str:
    total = sum(p.numel() for p in params)
    if not int8:
        return f"{total:,} parameters x {elem} B"
    low = sum(p.numel() for p in params if id(p) in int8)
    return f"{low:,} parameters in int8 (1 B, and a float32 scale per 256), {total - low:,} x {elem} B"


def _state_how(part: str, s: Setup, rank: int) -> str:
    from ..methods import METHODS

    if "moments" in part:
        return f"{s.base} on rank-{rank} projected gradients" if METHODS[s.method] else "none (full rank)"
    if "bases" in part:
        if not METHODS[s.method]:
            return "none (full rank)"
        basis = {**METHODS[s.method], **s.optim_args}.get("basis_dtype", "float32")
        return f"{METHODS[s.method]['tracker']} tracker, {basis} basis"
    return (
        f"{s.base} on the weights trained in full rank (all of them for {s.method})"
        if not METHODS[s.method]
        else (f"{s.base} on the embeddings, norms and head")
    )


def _fsdp_gathered(model, elem: int) -> int:
    """What FSDP2 holds unsharded in backward: the root module's own parameters (embeddings, final norm, head)
    and their gradients before the reduce-scatter, and three decoder blocks' parameters (the one computing, the
    one prefetched, and the one whose gradients are being reduced). Measured: LLaMA-350M on 2 ranks, 0.65-0.8 GiB
    of "rest" (docs/benchmarks.md)."""
    block = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
    blocks: dict[str, int] = {}
    root = 0
    for name, p in model.named_parameters():
        found = block.search(name)
        if found:
            blocks[found.group(1)] = blocks.get(found.group(1), 0) + p.numel()
        else:
            root += p.numel()
    return (2 * root + 3 * max(blocks.values(), default=0)) * elem


def _per(shard: int) -> str:
    return f" / {shard} (FSDP2 shards)" if shard > 1 else ""
