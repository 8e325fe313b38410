"""Adding a method is one tracker (or rule) and one preset line: a tracker and a rule defined here, registered here,
work in the optimizer, the memory formula, checkpoints and the contract checks, with no
other file touched."""

import io
import math

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups, train
from gradspace import METHODS, create_optimizer
from gradspace.bench import memory
from gradspace.components import LIKE_GRAD
from gradspace.rules import RULES, InnerRule
from gradspace.trackers import TRACKERS, Tracker
from gradspace.trackers.base import orthonormalize
from gradspace.trackers.svd import top_singular_basis
from test_rounding import CHECKPOINTS, weights_at_checkpoints


class PowerTracker(Tracker):
    """Subspace iteration: every T steps, one step S <- orth(G G^T S), plus a 2-vector of bookkeeping."""

    name = "power-test"
    defaults = {"iters": 1}
    state_keys = {"trk_seen": None}

    def validate(self, group):
        if group.get("iters", 1) < 1:
            raise ValueError("iters must be >= 1")

    def state_bytes(self, k, l, rank, group, clock=(1, 0)):
        return 4 * k * rank + 8

    def init(self, gn, rank, state, group, ctx):
        state["trk_seen"] = torch.zeros(2)
        return top_singular_basis(gn, rank, ctx.right)

    def update(self, gn, state, group, ctx):
        s, g = state.basis, gn.float()
        for _ in range(group["iters"]):
            s = orthonormalize(g @ (g.mT @ s))
        state["trk_seen"] += 1
        return s


class Signum(InnerRule):
    """Sign of a momentum buffer (elementwise, one moment)."""

    name = "signum-test"
    defaults = {"beta": 0.9}
    elementwise = True
    state_keys = {"sg_m": LIKE_GRAD}

    def state_bytes(self, shape, elem, group):
        return math.prod(shape) * elem

    def init_state(self, state, like, group):
        state["sg_m"] = torch.zeros_like(like, dtype=self.state_dtype(group, like.dtype))

    def update(self, grad, state, group):
        m = state["sg_m"].mul_(group["beta"]).add_(grad, alpha=1 - group["beta"])
        return m.sign(), 1.0

    def moments(self, state):
        return {"m": state["sg_m"].float()}

    def set_moments(self, state, moments):
        state["sg_m"] = moments["m"].to(state["sg_m"].dtype).contiguous()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(TRACKERS, PowerTracker.name, PowerTracker())
    monkeypatch.setitem(RULES, Signum.name, Signum())
    monkeypatch.setitem(METHODS, "power", {"tracker": "power-test", "moments": "rotate"})  # the preset line


@pytest.mark.parametrize("base", ["adamw", "signum-test"])
def test_a_new_tracker_and_rule_train_resume_and_count(registered, base):
    data = batches(20)
    model = make_model()
    opt = create_optimizer("power", projected_groups(model, rank=4, gap=5), lr=1e-2, base=base, iters=2)
    loss0 = nn.functional.mse_loss(model(data[0][0]), data[0][1]).item()
    train(model, opt, data[:12])
    assert (
        opt.state[model.mid.weight]["updates"] == 2
        and float(opt.state[model.mid.weight]["tracker"]["trk_seen"][0]) == 2
    )
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    expected = [p.detach().clone() for p in train(model, opt, data[12:]).parameters()]
    assert nn.functional.mse_loss(model(data[0][0]), data[0][1]).item() < loss0
    resumed = make_model()
    train(
        resumed,
        create_optimizer("power", projected_groups(resumed, rank=4, gap=5), lr=1e-2, base=base, iters=2),
        data[:12],
    )
    opt2 = create_optimizer("power", projected_groups(resumed, rank=4, gap=5), lr=1e-2, base=base, iters=2)
    opt2.load_state_dict(saved)
    train(resumed, opt2, data[12:])
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed.parameters()))
    with pytest.raises(ValueError, match="tracker"):  # another method's state is refused
        create_optimizer("galore", projected_groups(make_model(), rank=4, gap=5), base=base).load_state_dict(saved)


@pytest.mark.parametrize("base", ["adamw", "signum-test"])
def test_the_memory_formula_comes_from_the_components(registered, base):
    held, counted, model, _ = memory.count_state("tiny", "power", 8, {"base": base}, device="cpu", vocab=300)
    formula = memory.formula_bytes(model, "power", 8, {"base": base})
    assert held == counted == formula
    with pytest.raises(ValueError, match="iters"):
        create_optimizer("power", make_model(), rank=4, target_modules="mid", iters=0)


def test_a_new_preset_passes_the_rounding_check(registered):
    data = batches(max(CHECKPOINTS), seed=3)
    ref, _ = weights_at_checkpoints("power", data, perturb=False)
    got, _ = weights_at_checkpoints("power", data, perturb=True)
    for step in CHECKPOINTS:
        assert max(float((a - b).abs().max()) for a, b in zip(ref[step], got[step])) <= 1e-5
