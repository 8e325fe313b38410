"""update_stagger=True: each weight refreshes every T steps at its own phase, so one period's subspace updates are
spread over its steps instead of all landing on one; a resumed run keeps the phases."""

from itertools import pairwise

import pytest
import torch
from torch import nn

from gradspace import SubspaceOptimizer, create_optimizer


def stack(n=12, d=16):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(n)])


def step(model, opt, gen):
    x = torch.randn(8, 16, generator=gen)
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def refresh_steps(model, opt, steps, gen):
    """{weight index: [steps at which its basis was recomputed]} (the first basis excluded)."""
    seen = {i: [] for i in range(len(model))}
    for t in range(steps):
        before = [opt.state[m.weight].get("updates", 0) for m in model]
        step(model, opt, gen)
        for i, m in enumerate(model):
            if opt.state[m.weight]["updates"] > before[i]:
                seen[i].append(t)
    return seen


def test_each_weight_refreshes_every_period_at_its_own_phase():
    model = stack()
    gap = 4
    opt = create_optimizer(
        "galore", model, target_modules="all-linear", rank=2, update_proj_gap=gap, update_stagger=True
    )
    seen = refresh_steps(model, opt, 20, torch.Generator().manual_seed(1))
    phases = set()
    for times in seen.values():
        assert len(times) >= 4 and all(b - a == gap for a, b in pairwise(times))  # every T steps
        phases.add(times[0] % gap)
    assert phases == set(range(gap))  # spread over the whole period
    per_step = [sum(t in times for times in seen.values()) for t in range(1, 20)]
    assert max(per_step) == 3  # 12 weights over 4 phases; without staggering all 12 land on one step
    model = stack()
    plain = create_optimizer("galore", model, target_modules="all-linear", rank=2, update_proj_gap=gap)
    together = refresh_steps(model, plain, 20, torch.Generator().manual_seed(1))
    assert all(times == [4, 8, 12, 16] for times in together.values())  # without it: all at once


def test_a_resumed_run_keeps_the_phases_and_the_trajectory():
    gap = 5
    make = lambda m: create_optimizer(  # noqa: E731
        "galore", m, target_modules="all-linear", rank=2, update_proj_gap=gap, update_stagger=True
    )
    a, b = stack(), stack()
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    opt_a = make(a)
    for _ in range(13):
        step(a, opt_a, ga)
    opt_b = make(b)
    for _ in range(6):
        step(b, opt_b, gb)
    saved = opt_b.state_dict()
    opt_b = make(b)
    opt_b.load_state_dict(saved)
    for _ in range(7):
        step(b, opt_b, gb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert [opt_b.state[m.weight]["phase"] for m in b] == [i % gap for i in range(len(b))]


def test_trackers_with_their_own_schedule_refuse_it():
    w = nn.Parameter(torch.randn(8, 8))
    for tracker, moments in (("adarank", "rotate"), ("online_pca", "keep")):
        with pytest.raises(ValueError, match="own schedule"):
            SubspaceOptimizer([{"params": [w], "rank": 2}], tracker=tracker, moments=moments, update_stagger=True)
    with pytest.raises(ValueError, match="update_stagger must be True or False"):
        SubspaceOptimizer([{"params": [w], "rank": 2, "update_stagger": "yes"}])
