"""Batched steps (``SubspaceOptimizer(..., batched=True)``): projected weights of one shape and settings stepped
together, as torch.optim's ``foreach`` path steps AdamW.

One ``bmm`` projects all their gradients onto their bases, the inner rule runs over the list with
``torch._foreach_*`` (``InnerRule.update_many``), one ``bmm`` maps the directions back and one ``_foreach_add_``
writes the weights: the operations of a step grow with the number of distinct weight shapes, not with the number
of weights (a LLaMA has 7 shapes and 7 x layers weights), which is what kernel launches cost on a GPU.

A weight joins its batch on a step when nothing on that step is its own: its basis is not due (the per-weight
loop refreshes it, and it rejoins on the next step), its tracker neither reads every gradient nor moves every step
(``svd``, ``grasswalk``, ``grassjump``), the output is a plain back-projection (not Fira's recovery, which the
GrassWalk and GrassJump presets use; APOLLO's scaling batches too): among the presets, GaLore, APOLLO and
APOLLO-Mini, with any rule; and it is a plain local tensor with a float32 basis, stepped without
stochastic rounding. Everything else takes the loop, whose results the batched step matches to float32 rounding
(``tests/test_batched.py``, every preset and rule).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import distributed as dist_support
from .components import TrackerState, part
from .int8_weights import is_int8
from .projection import oriented
from .rules import get_rule
from .trackers import get_tracker
from .trackers.base import Tracker


def key(opt, group: dict, p: torch.Tensor) -> tuple[Any, ...] | None:
    """The batch ``p`` joins on this step (weights with equal keys step together), or None: the per-weight loop."""
    if opt.distributed is not None or opt._new_bases is not None or dist_support.is_dtensor(p) or is_int8(p):
        return None
    if opt._rounds(p) or group.get("basis_dtype", "float32") != "float32" or group["recovery"]:
        return None
    output = group.get("output", "project")
    if output == "scale" and "rec_norm" not in opt.state[p].get("output", {}):
        return None  # APOLLO's limiter starts on the weight's first step (in the loop)
    if output not in ("project", "scale"):
        return None
    tracker = get_tracker(group["tracker"])
    quiet = type(tracker).observe is Tracker.observe and type(tracker).after_step is Tracker.after_step
    if not quiet or tracker.moves_every_step:
        return None
    state = opt.state[p]
    if "basis" not in state:  # the first step builds the basis
        return None
    right, _ = opt.layout(p, group)
    if tracker.due(oriented(p.grad, right), TrackerState(state), group):
        return None
    basis = state["basis"]
    return (id(group), tuple(p.shape), p.dtype, p.grad.dtype, right, tuple(basis.shape), basis.dtype, p.device)


def step(opt, group: dict, params: list[torch.Tensor], right: bool) -> None:
    """One non-update step of ``params`` (equal ``key``s), as the loop's ``_step_unpacked`` takes it weight by
    weight: project, observe nothing, captured energy, inner rule, back-projection, step count, decay."""
    states = [opt.state[p] for p in params]
    bases = torch.stack([s["basis"] for s in states])  # B x k x r
    grads = torch.stack([oriented(p.grad, right) for p in params]).to(bases.dtype)  # B x k x l
    gts = bases.mT @ grads  # B x r x l
    tracker = get_tracker(group["tracker"])
    if opt.collect_diagnostics:
        _energies(opt, params, bases, grads, gts, tracker.orthonormal)
    rule = get_rule(group["base"])
    directions, factors = rule.update_many(list(gts.unbind(0)), [part(s, "rule") for s in states], group)
    ots = torch.stack([d.to(bases.dtype) for d in directions])  # B x r x l
    factors = torch.tensor(factors, dtype=bases.dtype, device=bases.device)
    if group.get("output", "project") == "project":
        updates, alpha = bases @ ots.mul_((factors * float(group["scale"])).view(-1, 1, 1)), 1.0  # B x k x l
    else:
        updates, alpha = _scaled_gradients(states, grads, gts, ots, factors, group), math.sqrt(float(group["scale"]))
    updates = updates.mT if right else updates
    weights = [p.data for p in params]
    torch._foreach_add_(weights, list(updates.unbind(0)), alpha=-float(group["lr"]) * alpha)
    for s in states:
        s["step"] += 1
    opt._decay(group, weights)


def _scaled_gradients(states, grads, gts, ots, factors, group) -> torch.Tensor:
    """APOLLO's output (``update.scale_gradient``) for the batch: ``Gn * s`` with ``s`` per column (or per
    tensor), limited by each weight's norm-growth limiter, times the rule's factor; ``sqrt(scale)`` is the
    caller's."""
    if group.get("scale_type", "channel") == "channel":
        s = torch.linalg.vector_norm(ots, dim=1) / (torch.linalg.vector_norm(gts, dim=1) + 1e-8)  # B x l
    else:
        whole = torch.linalg.vector_norm(ots, dim=(1, 2)) / (torch.linalg.vector_norm(gts, dim=(1, 2)) + 1e-8)
        s = whole.unsqueeze(1).expand(-1, grads.shape[2])
    norm = (s.square() * grads.square().sum(dim=1)).sum(dim=1).sqrt()  # B
    last = torch.stack([st["output"]["rec_norm"] for st in states]).to(norm.dtype)
    zeta = float(group["recovery_limit"])
    limiter = torch.ones_like(norm)
    if math.isfinite(zeta):
        limiter = torch.where(last > 0, (norm / (last + 1e-8)).clamp_min(zeta) / zeta, limiter)
    for st, kept in zip(states, (norm / limiter).unbind(0)):
        st["output"]["rec_norm"] = kept
    return grads * (s * (factors / limiter).unsqueeze(1)).unsqueeze(1)


def _energies(opt, params, bases, grads, gts, orthonormal: bool) -> None:
    """``captured_energy`` of each weight, for the whole batch: ``||Gt||^2 / ||Gn||^2``, or with a basis that is
    not orthonormal (APOLLO's) ``tr((S^T S)^-1 Gt Gt^T) / ||Gn||^2``, each weight's inverse Gram kept until its
    basis changes, as the loop keeps it."""
    from .energy import inverse_gram

    norms = torch.linalg.vector_norm(grads, dim=(1, 2), dtype=torch.promote_types(grads.dtype, torch.float32))
    if orthonormal:
        captured = gts.square().sum(dim=(1, 2))
    else:
        grams = torch.stack([inverse_gram(opt.state[p]["basis"], opt._diag_of(p)) for p in params])
        captured = (grams * (gts @ gts.mT)).sum(dim=(1, 2))
    for p, energy in zip(params, (captured / norms.square()).unbind(0)):
        opt._diag_of(p)["energy"] = energy
