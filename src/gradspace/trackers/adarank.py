"""AdaRankGrad's tracker (docs/methods.md): adaptive rank and adaptive update times.

Range finder (Algorithm 1, SSRF): ``Omega`` (n x ``r_max``, Gaussian), ``Q = qr(G Omega).Q``, then
``power_iters`` power iterations ``Q = qr(G G^T Q).Q`` (not in the paper: ``power_iters=0`` is its Algorithm 1).

Basis, option ``basis``:

- ``"ordered"`` (default): ``B = Q^T G = Ub Sb Vb^T`` and the basis ``Q Ub``, whose prefixes are the best ones
  inside ``span(Q)``. ``Ub``, ``Sb^2`` come from the eigendecomposition of the r x r ``B B^T`` (the factors of
  ``svd(B)`` at about a tenth of its cost). Prefix error: ``1 - sum_{i<=r} Sb_i^2 / ||G||_F^2``, which is what
  Algorithm 2's comment (``sum_{i>r} sigma_i^2 / sum_i sigma_i^2``) assumes.
- ``"prefix"``: Algorithms 1-2 literally: ``Q[:, :r]`` of the range finder's own ``Q``, no rotation. ``Q`` is
  orthonormal, so the prefix error is exactly ``1 - sum_{i<=r} ||(Q^T G)_i||^2 / ||G||_F^2`` (row i of ``Q^T G``).
  Without power iterations the leading columns of ``Q`` are random mixtures of the top directions, so a prefix
  needs at least the ordered basis's rank for the same error.

Rank (Algorithm 2): the smallest ``r`` in ``[r_min, r_max]`` meeting the threshold, from one cumulative sum (the
paper's binary search is not needed); ``r_max`` if none does (a randomised estimate can only under-capture).
Option ``criterion``:

- ``"squared"`` (default, eq. 2 and Algorithm 3's definition of ``r_t``): ``||G - S S^T G||_F^2 / ||G||_F^2 <=
  eta_th``, i.e. drop at most ``eta_th`` of the gradient's energy;
- ``"unsquared"`` (the box of Algorithm 2): ``||G - S S^T G||_F / ||G||_F <= eta_th``; the paper's 0.48 then
  allows a squared error of only 0.23.

``r_min`` (default 1: Lemma 1 says gradients tend to rank one) floors the rank; ``r_max`` (default: the
group's rank) caps it.

Update times (Algorithm 3, block 3): refresh when the projected gradient has converged,
``||Gt|| <= varsigma * ||Gt at the last refresh||``, or when the subspace has gone stale under the same
``criterion``: captured energy ``e = ||Gt||^2 / ||G||^2`` below ``1 - eta_th`` (squared), or residual ratio
``sqrt(1 - e) > eta_th`` (unsquared); always within ``min_gap <= steps since refresh <= max_gap``. ``due``
runs before this step's projection, so it reads what ``observe`` recorded at the previous step (a one-step lag):
judging the current gradient instead would cost a second projection every step. The recorded values stay
tensors, so nothing syncs with the device before ``min_gap``. The diagnostic ``trk_diag_error`` is always the
squared error fraction of the chosen basis, whatever the criterion.

Random draws come from a generator seeded by (seed, parameter index, basis number): resumed runs and
data-parallel ranks draw the same ``Omega``. The rank changes, so use a moment policy that can follow it
(``rotate``, the paper's, or ``project``/``reset``).
"""

from __future__ import annotations

import torch

from .base import Context, Tracker, basis_bytes, seeded_generator
from .svd import left_singular, signed, validate_sign


def _opt(group: dict, key: str):
    value = group.get(key)
    return AdaRankTracker.defaults[key] if value is None else value


def _gaps(group: dict) -> tuple[int, int]:
    """(min_gap, max_gap); by default update_proj_gap bounds the refresh from above, a quarter of it below."""
    hi = group.get("max_gap") or group.get("update_proj_gap", 200)
    lo = group.get("min_gap") or max(1, hi // 4)
    return lo, hi


CRITERIA = ("squared", "unsquared")
BASES = ("ordered", "prefix")


def _is_int(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


class AdaRankTracker(Tracker):
    name = "adarank"
    update_diagnostics = ("trk_diag_error",)
    diagnostics = ("trk_diag_error", "trk_diag_gap")
    state_keys = dict.fromkeys(("trk_last", "trk_ref", "trk_norm", "trk_energy", "trk_diag_error", "trk_diag_gap"))
    defaults = {
        "r_min": 1,  # rank floor; Lemma 1: gradients tend to rank one, so allow it
        "r_max": None,  # None: the group's rank
        "eta_th": 0.48,  # the paper's pretraining value
        "criterion": "squared",  # eq. 2: squared error fraction <= eta_th; "unsquared": Algorithm 2's box
        "basis": "ordered",  # Q Ub; "prefix": Q[:, :r], Algorithm 2 literally
        "varsigma": 0.5,  # refresh once the projected gradient has halved since the refresh
        "min_gap": None,  # None: max(1, max_gap // 4)
        "max_gap": None,  # None: update_proj_gap (never staler than GaLore)
        "power_iters": 2,
        "svd_sign": "lapack",  # "canonical": each column's largest entry positive (trackers/svd.py)
    }

    def validate(self, group: dict) -> None:
        r_min, r_max = _opt(group, "r_min"), group.get("r_max")
        if not _is_int(r_min, 1):
            raise ValueError(f"r_min must be a positive integer, got {r_min!r}")
        if r_max is not None and not _is_int(r_max, 1):
            raise ValueError(f"r_max must be a positive integer or None (the group's rank), got {r_max!r}")
        r_max = r_max if r_max is not None else group.get("rank")
        if r_max is not None and r_min > r_max:
            raise ValueError(f"r_min ({r_min}) must be <= r_max ({r_max}; defaults to the group's rank)")
        eta_th = float(_opt(group, "eta_th"))
        if not 0.0 < eta_th < 1.0:
            raise ValueError(f"eta_th must be in (0, 1), got {eta_th}")
        for key, allowed in (("criterion", CRITERIA), ("basis", BASES)):
            if (value := _opt(group, key)) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        varsigma = float(_opt(group, "varsigma"))
        if not 0.0 <= varsigma <= 1.0:
            raise ValueError(f"varsigma must be in [0, 1], got {varsigma}")
        for key in ("min_gap", "max_gap"):
            if group.get(key) is not None and not _is_int(group[key], 1):
                raise ValueError(f"{key} must be a positive integer or None, got {group[key]!r}")
        lo, hi = _gaps(group)
        if lo > hi:
            raise ValueError(f"min_gap ({lo}) must be <= max_gap ({hi}; defaults to update_proj_gap)")
        power_iters = _opt(group, "power_iters")
        if not _is_int(power_iters, 0):
            raise ValueError(f"power_iters must be a non-negative integer, got {power_iters!r}")
        validate_sign(group)
        if group.get("moments") == "keep" and r_min != r_max:
            raise ValueError(
                "moments='keep' cannot follow the rank changes of tracker 'adarank'; use moments='rotate' "
                "(AdaRankGrad's), 'project' or 'reset', or set r_min == r_max"
            )

    def state_bytes(self, k, l, rank, group, clock=(1, 0)) -> int:
        """The basis, two scalars (error, reference norm), two more once ``min_gap`` steps have passed since a
        refresh (norm, energy) and one after the first refresh (gap)."""
        since, refreshes = clock
        return (
            basis_bytes(k, rank, group)
            + 8
            + (8 if since >= _gaps(group)[0] or refreshes else 0)
            + (4 if refreshes else 0)
        )

    def init(self, gn, rank, state, group, ctx: Context):
        state["trk_last"] = state.step
        return self._select(gn, rank, state, group, ctx, draw=0)

    def update(self, gn, state, group, ctx: Context):
        return self._select(gn, group["rank"], state, group, ctx, draw=state.updates + 1)

    def on_update(self, state, group) -> None:
        """The refresh clock restarts."""
        state["trk_diag_gap"] = torch.tensor(float(state.step - state["trk_last"]), device=state.basis.device)
        state["trk_last"] = state.step

    periodic = False  # its own refresh rule

    def due(self, gn, state, group) -> bool:
        lo, hi = _gaps(group)
        since = state.step - state["trk_last"]
        if since < lo:
            return False
        if since >= hi:
            return True
        converged = state["trk_norm"] <= float(_opt(group, "varsigma")) * state["trk_ref"]
        eta_th = float(_opt(group, "eta_th"))
        if _opt(group, "criterion") == "squared":
            stale = state["trk_energy"] < 1.0 - eta_th
        else:
            stale = (1.0 - state["trk_energy"]).clamp_min(0.0).sqrt() > eta_th
        return bool(converged | stale)

    def observe(self, gn, gt, state, group) -> None:
        step, last = state.step, state["trk_last"]
        if step == last:
            state["trk_ref"] = torch.linalg.vector_norm(gt)
        if step + 1 - last < _gaps(group)[0]:
            return  # due() does not look before min_gap: skip the extra read of G
        gt_sq = gt.square().sum()
        state["trk_norm"] = gt_sq.sqrt()
        state["trk_energy"] = (
            gt_sq / torch.linalg.vector_norm(gn, dtype=torch.promote_types(gn.dtype, torch.float32)).square()
        )

    def _select(self, gn, rank: int, state: dict, group: dict, ctx: Context, draw: int) -> torch.Tensor:
        """Range finder + ordered or prefix basis + one-pass rank choice (Algorithms 1-2)."""
        g = gn.detach().float()
        r_max = min(group.get("r_max") or rank, *g.shape)
        if g.is_meta:  # shapes only (bench memory): no data to choose a rank from, so the initial rank r_max
            state["trk_diag_error"] = g.new_empty(())
            return g.new_empty((g.shape[0], r_max))
        r_min = min(int(_opt(group, "r_min")), r_max)
        gen = seeded_generator(ctx, draw, g.device)
        omega = torch.randn(g.shape[1], r_max, generator=gen, device=g.device)
        q = torch.linalg.qr(g @ omega).Q
        for _ in range(int(_opt(group, "power_iters"))):
            q = torch.linalg.qr(g @ (g.mT @ q)).Q
        b = q.mT @ g
        if _opt(group, "basis") == "prefix":
            captured = b.double().square().sum(1)  # row energies: exact for prefixes of an orthonormal Q
        else:
            ub, captured = left_singular(b)
        total = torch.linalg.vector_norm(g).double().square().clamp_min(torch.finfo(torch.float32).tiny)
        err = (1.0 - captured.cumsum(0) / total).float().clamp_min(0.0)  # squared error of each prefix 1..r_max
        meets = err if _opt(group, "criterion") == "squared" else err.sqrt()
        ok = meets <= float(_opt(group, "eta_th"))
        ok[: r_min - 1] = False
        r = int(torch.where(ok.any(), ok.int().argmax() + 1, r_max))  # the one host sync: shapes depend on it
        state["trk_diag_error"] = err[r - 1].clone()  # not a view: it would hold all of err
        if _opt(group, "basis") == "prefix":
            return signed(q[:, :r].contiguous(), group)
        return signed((q @ ub[:, :r]).contiguous(), group)
