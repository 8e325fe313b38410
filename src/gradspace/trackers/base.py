"""The tracker seam: how the basis ``S`` of a weight's gradient subspace is found and moved.

A tracker works in the oriented frame (see ``gradspace.projection``): it sees the k x l oriented gradient ``Gn`` and
keeps a k x r orthonormal basis. It knows nothing about the inner rule. Its own state (accumulators, small
optimizers, counters) is its part of the parameter's state (``state["tracker"]``), under the keys it declares in
``state_keys`` (``gradspace.components``), as tensors and numbers only, so checkpoints load with
``weights_only=True``. The ``state`` its methods get is a ``gradspace.components.TrackerState``: that part, plus
read-only ``state.step``, ``state.updates``, ``state.phase`` and ``state.basis`` (the optimizer's).

Under ``distributed="shard_updates"`` ``update`` runs on one rank and the new basis is broadcast; ``on_update`` runs
on every rank, so bookkeeping that restarts with a new basis goes there, once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ..basis_storage import basis_bytes


@dataclass(frozen=True)
class Context:
    """What a tracker may know about the weight besides its gradient."""

    index: int  # the parameter's index in the optimizer (stable across runs of the same model)
    right: bool  # basis on the columns: Gn is G^T (used to take SVDs in the weight's own layout)
    seed: int  # the optimizer's seed for random trackers


class Tracker:
    name: str = ""
    #: group hyperparameters this tracker reads, with defaults (merged into the optimizer defaults)
    defaults: dict[str, Any] = {}
    #: the options that fix its state's layout: a checkpoint saved with other values is refused
    structural: tuple[str, ...] = ()
    #: every state entry it writes -> ``LIKE_GRAD`` or None (``gradspace.components``)
    state_keys: dict[str, str | None] = {}
    #: 0-d state entries reported per weight by ``SubspaceOptimizer.diagnostics()``
    diagnostics: tuple[str, ...] = ()
    #: the basis moves after every step (``after_step``) rather than in ``update`` (benchmarks time that move)
    moves_every_step: bool = False
    #: ``observe``/``after_step`` read the full gradient every step; if False, layer-wise mode may accumulate
    #: micro-batch gradients already projected (r x l) between subspace updates instead of in full (k x l)
    needs_every_gradient: bool = True
    #: 0-d tensor entries that ``update`` writes as diagnostics; with ``distributed="shard_updates"`` they travel
    #: with the new basis to the ranks that did not compute it
    update_diagnostics: tuple[str, ...] = ()
    #: the basis has S^T S = I to float32 accuracy (recovery scaling then needs no Gram matrix)
    orthonormal: bool = True
    #: refreshes every ``update_proj_gap`` steps through ``due`` below (so ``update_stagger`` can shift its phase)
    periodic: bool = True

    def validate(self, group: dict) -> None:
        """Raise ValueError naming the bad hyperparameter."""

    def state_bytes(self, k: int, l: int, rank: int, group: dict, clock: tuple[int, int] = (1, 0)) -> int:
        """Bytes of this tracker's state for a k x l oriented gradient at ``rank``, the float32 k x rank basis
        included, after the first step: the memory formula, which ``gradspace.bench memory`` checks against the
        state it counts. ``clock`` = (steps since the last refresh, refreshes), for bookkeeping that depends on it."""
        return basis_bytes(k, rank, group)

    def init(self, gn: torch.Tensor, rank: int, state: dict, group: dict, ctx: Context) -> torch.Tensor:
        """The first basis (k x rank, float32), from the first gradient."""
        raise NotImplementedError

    def due(self, gn: torch.Tensor, state: dict, group: dict) -> bool:
        """Whether the basis moves before this step's projection (``state.step`` is the step about to run):
        every ``update_proj_gap`` steps, shifted by the weight's ``phase`` under ``update_stagger``."""
        return (state.step - state.phase) % group["update_proj_gap"] == 0

    def update(self, gn: torch.Tensor, state: dict, group: dict, ctx: Context) -> torch.Tensor:
        """The new basis (row-major); may differ in rank from the old one. Under ``shard_updates``
        it runs on one rank, so the only state it may leave changed is its ``update_diagnostics`` (which travel
        with the basis): anything else belongs in ``on_update``, which every rank runs."""
        raise NotImplementedError

    def on_update(self, state: dict, group: dict) -> None:
        """Called after every basis move, on every rank (``update`` may have run on another one): restart what
        the new basis restarts (accumulators, refresh clocks). ``state.basis`` is still the old basis."""

    def observe(self, gn: torch.Tensor, gt: torch.Tensor, state: dict, group: dict) -> None:
        """Called every step after projection (accumulators, convergence criteria)."""

    def after_step(self, gn: torch.Tensor, state: dict, group: dict, ctx: Context) -> None:
        """Called every step after the weight moved (trackers that move the basis every step do so here, in place
        on ``state.basis``, which is float32 for them: ``basis_storage.validate``)."""


def orthonormalize(s: torch.Tensor) -> torch.Tensor:
    """QR with column signs fixed (diag(R) >= 0), so the result is a deterministic function of the input.
    Row-major like every other basis: the layout picks the matmul kernel, hence the rounding (and a basis
    broadcast to other data-parallel ranks arrives row-major)."""
    q, r = torch.linalg.qr(s)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs).contiguous()


def orthonormality_error(s: torch.Tensor) -> float:
    eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    return float(torch.linalg.matrix_norm(s.mT @ s - eye))


def seeded_generator(ctx: Context, draw: int, device: torch.device, purpose: str = "") -> torch.Generator:
    """A generator for the ``draw``-th basis of parameter ``ctx.index`` (0 = the initial basis); ``purpose``
    separates independent streams of one draw (the randomized SVD's sketch from a random tracker's move).

    blake2b, not ``hash()``: Python salts string hashes per process, and ranks and resumed runs must agree.
    """
    key = f"gradspace:{ctx.seed}:{ctx.index}:{draw}" + (f":{purpose}" if purpose else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
