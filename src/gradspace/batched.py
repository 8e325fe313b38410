"""Batched steps (``SubspaceOptimizer(..., batched=True)``): projected weights of one shape and settings stepped
together, as torch.optim's ``foreach`` path steps AdamW.

Each weight's gradient is projected and its update written back by one large kernel each, as in the loop, and
everything between runs once for the whole batch on the small r x l projections: the inner rule over the list with
``torch._foreach_*`` (``InnerRule.update_many``), the captured energy, APOLLO's scales and limiter, the decay. A
step then launches two kernels per weight plus a fixed number per shape, instead of about twenty per weight.

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
from .projection import add_back, oriented, project
from .recovery import add_scaled_gradient
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
    weight: project, observe nothing, captured energy, inner rule, back-projection, step count, decay.

    The two large products of each weight, ``S^T Gn`` and the write-back into the weight (``addmm_`` or APOLLO's
    ``addcmul_``), stay one kernel per weight, as in the loop: stacking the gradients for one ``bmm`` would copy
    all of them (a LLaMA-7B MLP shape's 32 gradients are 5.8 GB in float32) and measured 1.85x the loop's step
    on CPU. What is batched is everything between them, on the r x l projections, which are small."""
    states = [opt.state[p] for p in params]
    bases = [s["basis"] for s in states]
    grads = [oriented(p.grad, right) for p in params]
    gts = [project(b, g) for b, g in zip(bases, grads)]  # one matmul each, r x l
    scaled = group.get("output", "project") == "scale"
    stacked = torch.stack(gts) if opt.collect_diagnostics or scaled else None  # B x r x l: small
    if opt.collect_diagnostics:
        _energies(opt, params, grads, stacked, get_tracker(group["tracker"]).orthonormal)
    rule = get_rule(group["base"])
    directions, factors = rule.update_many(gts, [part(s, "rule") for s in states], group)
    lr = float(group["lr"])
    if not scaled:
        for p, basis, d, f in zip(params, bases, directions, factors):
            add_back(p.data, basis, d, right, -lr * f * float(group["scale"]))  # the loop's write, fused
    else:
        ots = torch.stack([d.to(stacked.dtype) for d in directions])
        scales = _apollo_scales(states, grads, stacked, ots, group)
        alpha = -lr * math.sqrt(float(group["scale"]))
        for p, g, c, f in zip(params, grads, scales.unbind(0), factors):
            add_scaled_gradient(p.data, g, c, right, alpha * f)
    for s in states:
        s["step"] += 1
    opt._decay(group, [p.data for p in params])


def _apollo_scales(states, grads, gts, ots, group) -> torch.Tensor:
    """APOLLO's column factors (``update.scale_gradient``) for the batch, B x l: ``||Ot||/||Gt||`` per column (or
    per tensor), divided by each weight's norm-growth limiter, whose last norms it updates."""
    if group.get("scale_type", "channel") == "channel":
        s = torch.linalg.vector_norm(ots, dim=1) / (torch.linalg.vector_norm(gts, dim=1) + 1e-8)  # B x l
    else:
        whole = torch.linalg.vector_norm(ots, dim=(1, 2)) / (torch.linalg.vector_norm(gts, dim=(1, 2)) + 1e-8)
        s = whole.unsqueeze(1).expand(-1, gts.shape[2])
    dtype = torch.promote_types(grads[0].dtype, gts.dtype)
    gn_sq = torch.stack([torch.linalg.vector_norm(g, dim=0, dtype=dtype) for g in grads]).square().to(gts.dtype)
    norm = (s.square() * gn_sq).sum(dim=1).sqrt()  # B
    last = torch.stack([st["output"]["rec_norm"] for st in states]).to(norm.dtype)
    zeta = float(group["recovery_limit"])
    limiter = torch.ones_like(norm)
    if math.isfinite(zeta):
        limiter = torch.where(last > 0, (norm / (last + 1e-8)).clamp_min(zeta) / zeta, limiter)
    for st, kept in zip(states, (norm / limiter).unbind(0)):
        st["output"]["rec_norm"] = kept
    return s / limiter.unsqueeze(1)


def _energies(opt, params, grads, gts, orthonormal: bool) -> None:
    """``captured_energy`` of each weight, for the whole batch: ``||Gt||^2 / ||Gn||^2``, or with a basis that is
    not orthonormal (APOLLO's) ``tr((S^T S)^-1 Gt Gt^T) / ||Gn||^2``, each weight's inverse Gram kept until its
    basis changes, as the loop keeps it."""
    from .energy import inverse_gram

    dtype = torch.promote_types(grads[0].dtype, torch.float32)
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=dtype))
    if orthonormal:
        captured = gts.square().sum(dim=(1, 2))
    else:
        grams = torch.stack([inverse_gram(opt.state[p]["basis"], opt._diag_of(p)) for p in params])
        captured = (grams * (gts @ gts.mT)).sum(dim=(1, 2))
    for p, energy in zip(params, (captured / norms.square()).unbind(0)):
        opt._diag_of(p)["energy"] = energy
