import json
import math

import pytest
import torch
from torch import nn

from gradspace import cli
from gradspace.projection import largest_principal_angle
from gradspace.trackers import Context
from gradspace.trackers.base import orthonormalize

# tiny models run faster on one thread, and CI machines have 2 cores shared with the test runner
torch.set_num_threads(1)


class ThreeShapes(nn.Module):
    """Weights with m < n, m > n and m == n (plus biases and a norm) for optimizer tests."""

    def __init__(self, d_in=24, wide=40, d_out=8):
        super().__init__()
        self.up = nn.Linear(d_in, wide)  # weight 40 x 24: m > n
        self.mid = nn.Linear(wide, wide)  # 40 x 40: m == n
        self.down = nn.Linear(wide, d_in)  # 24 x 40: m < n
        self.norm = nn.LayerNorm(d_in)
        self.head = nn.Linear(d_in, d_out)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        h = torch.tanh(self.mid(h))
        return self.head(self.norm(self.down(h)))


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ThreeShapes().to(dtype)


def batches(n, seed=1, batch=16, d_in=24, d_out=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d_in, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(batch, d_out, generator=g)))
    return out


def train(model, opt, data, dtype=torch.float32):
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
    return model


def projected_groups(model, rank=6, gap=20, **extra):
    targets = [model.up.weight, model.mid.weight, model.down.weight]
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": targets, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std", **extra},
        {"params": rest},
    ]


def rotating_stream(steps, omega, k=30, l=60, r=4, noise=0.3, seed=0):
    """Gradients ``G_t = U_t diag(s) V^T + noise`` (k x l) whose rank-r left subspace turns by a fixed
    rotation ``exp(K)`` per step: column i of ``U_0`` turns toward its own orthogonal direction at
    ``omega * rate_i`` rad/step, so the largest principal angle between ``U_t`` and ``U_0`` is ``omega * t``.
    Yields ``(G_t, U_t)``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(k, 2 * r, generator=gen)).Q
    u0, w = q[:, :r], q[:, r:]
    v = torch.linalg.qr(torch.randn(l, r, generator=gen)).Q
    spectrum = torch.tensor([4.0, 3.0, 2.0, 1.5])[:r]
    rates = torch.linspace(1.0, 0.25, r)
    for t in range(steps):
        ut = u0 * torch.cos(omega * t * rates) + w * torch.sin(omega * t * rates)
        yield (ut * spectrum) @ v.mT + noise * torch.randn(k, l, generator=gen) / math.sqrt(l), ut


def angle(basis, truth):
    """Largest principal angle between spans (online PCA's P is only near-orthonormal)."""
    return float(largest_principal_angle(orthonormalize(basis), truth))


CTX = Context(index=0, right=False, seed=0)


def with_spectrum(s: torch.Tensor, k: int, l: int, gen: torch.Generator) -> torch.Tensor:
    """A k x l float32 matrix with singular values ``s`` and random orthonormal singular vectors."""
    u = torch.linalg.qr(torch.randn(k, len(s), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(l, len(s), generator=gen, dtype=torch.float64)).Q
    return ((u * s) @ v.mT).float()


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.arccos(torch.linalg.svdvals(a.double().mT @ b.double()).clamp(max=1.0))


@pytest.fixture
def model():
    return make_model()


def run(*argv):
    """``gradspace ARGV`` in this process; its exit code."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def lines(path):
    """The records of a JSONL file."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
