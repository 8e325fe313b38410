"""No preset amplifies float rounding: a 1e-7 relative change of every gradient moves the weights by at most
1e-5, after 2, 5 and 14 steps spanning three subspace updates (gap 4). GaLore's own sensitivity is ~1e-7; a
method that normalises noise (e.g. an Adam step on an exactly stationary loss) moves them by 1e-3 or more."""

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups
from gradspace import METHODS, create_optimizer

CHECKPOINTS = (2, 5, 14)


def weights_at_checkpoints(method, data, perturb):
    model = make_model()
    groups = [{"params": list(model.parameters())}] if METHODS[method] is None else projected_groups(model, gap=4)
    opt = create_optimizer(method, groups, lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(123)
    out = {}
    for step, (x, y) in enumerate(data, 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if perturb:
                p.grad.mul_(1.0 + 1e-7 * noise)
        opt.step()
        if step in CHECKPOINTS:
            out[step] = [p.detach().clone() for p in model.parameters()]
    return out, opt


@pytest.mark.parametrize("method", list(METHODS))
def test_a_1e_7_gradient_perturbation_moves_weights_by_at_most_1e_5(method):
    data = batches(max(CHECKPOINTS), seed=3)
    ref, opt = weights_at_checkpoints(method, data, perturb=False)
    got, _ = weights_at_checkpoints(method, data, perturb=True)
    if METHODS[method] is not None and METHODS[method]["tracker"] in ("svd", "subtrack", "grasswalk", "grassjump"):
        assert all(opt.state[p]["updates"] == 3 for p in opt.param_groups[0]["params"])
    for step in CHECKPOINTS:
        moved = max(float((a - b).abs().max()) for a, b in zip(ref[step], got[step]))
        assert moved <= 1e-5, f"{method}: weights moved by {moved:.2e} after {step} steps"
