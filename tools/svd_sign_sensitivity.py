"""How much a 1e-7 change of the gradients moves GaLore's weights, with LAPACK's singular-vector signs and with
``svd_sign="canonical"``; and how far each is from galore-torch on the same gradients (README, "What you can
rely on").

    OMP_NUM_THREADS=1 python tools/svd_sign_sensitivity.py [--seeds 0 1 2 ...] [--steps 50]

One 64 x 128 weight, GaLore-AdamW at rank 8, update gap 10 (bases at steps 0, 10, 20, ...), lr 1e-2, fed a fixed
sequence of random gradients of rank 16, as a linear layer's gradient on a batch of 16 is (``X^T D``); the
perturbed run multiplies every entry by ``1 + 1e-7 n``, ``n ~ N(0, 1)``. A difference is
``||W_a - W_b||_F / ||W_b - W_0||_F`` (relative to the distance the weight moved), the largest over the steps.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gradspace import SubspaceOptimizer

SHAPE, BATCH, RANK, GAP, LR = (64, 128), 16, 8, 10, 1e-2


def gradients(seed: int, steps: int, noise: float) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = [
        torch.randn(BATCH, SHAPE[0], generator=gen).mT @ torch.randn(BATCH, SHAPE[1], generator=gen)
        for _ in range(steps)
    ]
    if noise:
        other = torch.Generator().manual_seed(10_000 + seed)
        grads = [g * (1.0 + noise * torch.randn(g.shape, generator=other)) for g in grads]
    return grads


def optimizer(w: torch.Tensor, kind: str) -> torch.optim.Optimizer:
    group = {"params": [w], "rank": RANK, "update_proj_gap": GAP, "scale": 0.25, "proj_type": "std"}
    if kind == "galore-torch":
        import galore_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return galore_torch.GaLoreAdamW([group], lr=LR)
    return SubspaceOptimizer([{**group, "svd_sign": kind}], lr=LR)


def trajectory(seed: int, steps: int, kind: str, noise: float = 0.0) -> list[torch.Tensor]:
    w = torch.nn.Parameter(0.02 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)))
    opt = optimizer(w, kind)
    out = [w.detach().clone()]
    for g in gradients(seed, steps, noise):
        w.grad = g.clone()
        opt.step()
        out.append(w.detach().clone())
    return out


def difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / (y - b[0]).norm()) for x, y in zip(a[1:], b[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("seed  1e-7 change, lapack  1e-7 change, canonical  lapack vs galore-torch  canonical vs galore-torch")
    for seed in args.seeds:
        runs = {kind: trajectory(seed, args.steps, kind) for kind in ("lapack", "canonical", "galore-torch")}
        moved = {
            kind: difference(trajectory(seed, args.steps, kind, 1e-7), runs[kind]) for kind in ("lapack", "canonical")
        }
        ref = runs["galore-torch"]
        print(
            f"{seed:4d}  {moved['lapack']:20.1e}  {moved['canonical']:23.1e}  "
            f"{difference(runs['lapack'], ref):22.1e}  {difference(runs['canonical'], ref):25.1e}"
        )


if __name__ == "__main__":
    main()
