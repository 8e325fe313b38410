"""Stochastic rounding of bfloat16 weights: unbiased, updates below half a bfloat16 step survive in expectation
(round-to-nearest drops them all), the moments keep the weight's dtype, and runs and resumed runs agree bit for
bit."""

import io

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups
from gradspace import SubspaceOptimizer, create_optimizer
from gradspace.rounding import stochastic_round_


def test_the_rounding_is_unbiased_and_lands_on_a_neighbour():
    value = torch.full((200_000,), 1.0 + 3e-3)  # between the bfloat16 neighbours 1.0 and 1.0078125
    out = torch.empty_like(value, dtype=torch.bfloat16)
    stochastic_round_(out, value, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0078125}
    assert out.float().mean().item() == pytest.approx(1.003, abs=2e-5)  # E[round(x)] = x
    negative = torch.full((200_000,), -2.0 - 5e-3)  # neighbours -2.0 and -2.015625
    stochastic_round_(out, negative, torch.Generator().manual_seed(1))
    assert out.float().mean().item() == pytest.approx(-2.005, abs=4e-5)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 3.0])
    small = torch.empty(5, dtype=torch.bfloat16)
    stochastic_round_(small, special, torch.Generator().manual_seed(2))
    assert small[:2].isinf().all() and small[2].isnan() and small[3:].tolist() == [0.0, 3.0]


def sgd_drift(rounding: str, steps: int = 50, lr: float = 1e-3):
    w = nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
    opt = SubspaceOptimizer([w], lr=lr, base="sgd", momentum=0.0, weight_rounding=rounding)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    return w.float().mean().item()


def test_updates_below_half_a_step_survive_only_with_stochastic_rounding():
    assert sgd_drift("nearest") == 1.0  # each 1e-3 step is under half of bfloat16's 2**-7 spacing at 1: lost
    assert sgd_drift("stochastic") == pytest.approx(1.0 - 50 * 1e-3, abs=1.5e-3)  # kept in expectation


def bf16_run(rounding, steps=12, state=None):
    model = make_model(dtype=torch.bfloat16)
    opt = create_optimizer("galore", projected_groups(model, rank=4, gap=5), lr=1e-2, weight_rounding=rounding)
    data = batches(steps)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        data = data[state["done"] :]
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x.to(torch.bfloat16)).float(), y).backward()
        opt.step()
    return model, opt


def test_galore_with_stochastic_rounding_trains_keeps_bfloat16_moments_and_resumes_exactly():
    model, opt = bf16_run("stochastic")
    nearest, _ = bf16_run("nearest")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    moments = [st["rule"][k] for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(opt.state) and all(v.dtype == torch.bfloat16 for v in moments)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), nearest.parameters()))
    again, _ = bf16_run("stochastic")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # the same random bits
    half, half_opt = bf16_run("stochastic", steps=6)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": half_opt.state_dict(), "done": 6}, buf)
    buf.seek(0)
    resumed, _ = bf16_run("stochastic", state=torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_bad_rounding_is_an_error():
    with pytest.raises(ValueError, match="weight_rounding must be one of auto, nearest, stochastic"):
        SubspaceOptimizer([nn.Parameter(torch.ones(3))], weight_rounding="up")
