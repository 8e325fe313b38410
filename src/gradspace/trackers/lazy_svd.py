"""Q-GaLore's lazy subspace updates (Zhang et al. 2024, q-galore-torch 1.0's ``GaLoreProjector``): GaLore's SVD of
the gradient every ``update_proj_gap`` steps, and each weight's own gap multiplied by ``gamma_proj`` once its
subspace has settled: at every refresh the cosine similarity of the new first basis vector with the previous one
joins a queue of the last ``queue_size``; when the queue is full and its mean is at least ``cos_threshold``, the
gap grows (and keeps growing at later refreshes while the mean stays there). A refresh is due when the step count
is a multiple of the current gap, as in q-galore-torch.

The similarity is signed, as in q-galore-torch: an SVD returns a singular vector up to its sign, so a settled
subspace can read as -1 and refresh as often as an unsettled one; ``svd_sign="canonical"`` fixes the signs.
The previous first vector is kept in float32 (``first_vector``), so the similarity does not depend on how the
basis is stored (``basis_dtype="int4"`` for Q-GaLore's 4-bit projections).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..basis_storage import basis_bytes
from .svd import SVD_DEFAULTS, SVDTracker, svd_basis, validate_svd


class LazySVDTracker(SVDTracker):
    name = "lazy-svd"
    needs_every_gradient = False
    defaults = {**SVD_DEFAULTS, "cos_threshold": 0.4, "gamma_proj": 2.0, "queue_size": 5}
    state_keys = {"gap": None, "first_vector": None, "similarities": None, "refreshed": None}

    def validate(self, group: dict) -> None:
        validate_svd(group)
        threshold, gamma, size = group["cos_threshold"], group["gamma_proj"], group["queue_size"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
            raise ValueError(f"cos_threshold must be a number in [-1, 1], got {threshold!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 1:
            raise ValueError(f"gamma_proj must be a number >= 1 (the gap's growth), got {gamma!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {size!r}")

    def state_bytes(self, k: int, l: int, rank: int, group: dict, clock: tuple[int, int] = (1, 0)) -> int:
        refreshes = clock[1]
        return basis_bytes(k, rank, group) + 4 * k + 4 * min(refreshes, group["queue_size"])

    def init(self, gn, rank, state, group, ctx):
        basis = svd_basis(gn, rank, group, ctx)
        state["gap"] = int(group["update_proj_gap"])
        state["first_vector"] = basis[:, 0].clone()
        state["similarities"] = torch.zeros(0)
        return basis

    def due(self, gn, state, group) -> bool:
        return (state.step - state.phase) % state["gap"] == 0

    def on_update(self, state: dict, group: dict) -> None:
        state["refreshed"] = 1  # the new basis is in place at after_step, on every rank

    def after_step(self, gn, state, group, ctx) -> None:
        if not state.pop("refreshed", 0):
            return
        first = state.basis[:, 0]
        similarity = F.cosine_similarity(state["first_vector"], first, dim=0).reshape(1).cpu()
        queue = torch.cat([state["similarities"], similarity])[-group["queue_size"] :]
        state["similarities"] = queue
        if len(queue) == group["queue_size"] and float(queue.mean()) >= group["cos_threshold"]:
            state["gap"] = int(state["gap"] * group["gamma_proj"])
        state["first_vector"] = first.clone()
