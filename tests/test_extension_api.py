"""The public extension API: a tracker, an inner rule and a preset defined in this file alone, registered with
``gradspace.register_tracker``/``register_rule``/``register_method``, train, checkpoint and resume bit-exactly, and
run under ``Layerwise`` and ``distributed="shard_updates"`` (two gloo processes) with no edit anywhere in src/."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradspace
from conftest import batches, make_model, projected_groups, train
from gradspace import create_optimizer
from gradspace.components import LIKE_GRAD
from gradspace.layerwise import Layerwise
from gradspace.rules import InnerRule
from gradspace.trackers import Tracker


class TopNormTracker(Tracker):
    """The basis is the r coordinate axes of the oriented gradient's largest rows (by 2-norm or max-norm), moved
    every ``update_proj_gap`` steps: orthonormal, cheap, and it reads the gradient only at its moves."""

    defaults = {"ranking": "norm"}
    structural = ("ranking",)  # not really (the state does not depend on it): here to test the declaration
    state_keys = {"tn_moves": None, "tn_diag_share": None}
    update_diagnostics = ("tn_diag_share",)
    diagnostics = ("tn_diag_share",)
    needs_every_gradient = False

    def validate(self, group):
        if group.get("ranking", "norm") not in ("norm", "max"):
            raise ValueError(f"ranking must be 'norm' or 'max', got {group['ranking']!r}")

    def _axes(self, gn, rank, group):
        g = gn.float()
        size = torch.linalg.vector_norm(g, ord=2 if group.get("ranking", "norm") == "norm" else math.inf, dim=1)
        rows = size.topk(rank).indices.sort().values
        return torch.eye(g.shape[0], device=g.device)[:, rows].contiguous(), g[rows].square().sum() / g.square().sum()

    def init(self, gn, rank, state, group, ctx):
        state["tn_moves"] = 0
        basis, state["tn_diag_share"] = self._axes(gn, rank, group)
        return basis

    def update(self, gn, state, group, ctx):  # one rank under shard_updates: only its update_diagnostics change
        basis, state["tn_diag_share"] = self._axes(gn, state.basis.shape[1], group)
        return basis

    def on_update(self, state, group):  # every rank
        state["tn_moves"] += 1


class SignMomentum(InnerRule):
    """signSGD with momentum: ``b <- beta b + (1 - beta) g``, direction ``sign(b)``."""

    defaults = {"sign_beta": 0.9}
    state_keys = {"sm_buf": LIKE_GRAD, "sm_step": None}
    elementwise = True

    def validate(self, group):
        if not 0.0 <= float(group["sign_beta"]) < 1.0:
            raise ValueError(f"sign_beta must be in [0, 1), got {group['sign_beta']}")

    def state_bytes(self, shape, elem, group):
        return math.prod(shape) * elem

    def init_state(self, state, like, group):
        state["sm_buf"] = torch.zeros_like(like, dtype=self.state_dtype(group, like.dtype))
        state["sm_step"] = 0

    def update(self, grad, state, group):
        state["sm_step"] += 1
        buf = state["sm_buf"].mul_(group["sign_beta"]).add_(grad, alpha=1.0 - group["sign_beta"])
        return buf.sign(), 1.0

    def moments(self, state):
        return {"m": state["sm_buf"].float()}

    def set_moments(self, state, moments):
        state["sm_buf"] = moments["m"].to(state["sm_buf"].dtype).contiguous()


PRESET = {"tracker": "top-norm", "moments": "reset"}  # reset: the rule's declared state restarts at every move


def register() -> None:
    gradspace.register_tracker("top-norm", TopNormTracker())
    gradspace.register_rule("sign-momentum", SignMomentum())
    gradspace.register_method("topnorm", PRESET)  # the preset line


def unregister() -> None:
    gradspace.unregister_method("topnorm")
    gradspace.unregister_rule("sign-momentum")
    gradspace.unregister_tracker("top-norm")


@pytest.fixture
def registered():
    register()
    yield
    unregister()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def build(model, base, **kw):
    return create_optimizer("topnorm", projected_groups(model, rank=4, gap=5), lr=1e-2, base=base, **kw)


# ------------------------------------------------------------------------------------------- registration checks
def test_registration_refuses_duplicates_and_incomplete_components(registered):
    with pytest.raises(ValueError, match="already registered"):
        gradspace.register_tracker("top-norm", TopNormTracker())
    with pytest.raises(ValueError, match="already registered"):
        gradspace.register_method("galore", PRESET)

    class NoUpdate(Tracker):
        def init(self, gn, rank, state, group, ctx):
            return gn[:, :rank]

    with pytest.raises(TypeError, match="does not implement update"):
        gradspace.register_tracker("no-update", NoUpdate())
    with pytest.raises(TypeError, match="instance"):
        gradspace.register_tracker("a-class", TopNormTracker)

    class NoState(InnerRule):
        def update(self, grad, state, group):
            return grad, 1.0

    with pytest.raises(TypeError, match="init_state, state_bytes"):
        gradspace.register_rule("no-state", NoState())

    class Loose(TopNormTracker):
        structural = ("order",)

    with pytest.raises(ValueError, match=r"structural option.*order"):
        gradspace.register_tracker("loose", Loose())

    class Reserved(SignMomentum):
        defaults = {"lr": 1.0}

    with pytest.raises(ValueError, match=r"lr.*belong to the optimizer"):
        gradspace.register_rule("reserved", Reserved())

    class BadKeys(SignMomentum):
        state_keys = {"sm_buf": 1}

    with pytest.raises(TypeError, match="state_keys"):
        gradspace.register_rule("bad-keys", BadKeys())
    assert {"no-update", "a-class", "loose"}.isdisjoint(gradspace.trackers.TRACKERS)
    assert {"no-state", "reserved", "bad-keys"}.isdisjoint(gradspace.rules.RULES)


def test_a_preset_is_checked_when_it_is_registered(registered):
    with pytest.raises(ValueError, match=r"did you mean 'ranking' \(an option of tracker top-norm\)"):
        gradspace.register_method("typo", {"tracker": "top-norm", "rankng": "max"})
    with pytest.raises(ValueError, match="belongs to tracker grasswalk, tracker subtrack"):
        gradspace.register_method("misplaced", {"tracker": "top-norm", "eta": 1.0})
    with pytest.raises(ValueError, match="unknown tracker"):
        gradspace.register_method("nowhere", {"tracker": "top-nrom"})
    with pytest.raises(ValueError, match="ranking must be"):
        gradspace.register_method("bad-value", {"tracker": "top-norm", "ranking": "mean"})
    assert {"typo", "misplaced", "nowhere", "bad-value"}.isdisjoint(gradspace.METHODS)


def test_a_misspelt_option_names_the_closest_key_and_its_owner(registered):
    with pytest.raises(ValueError, match=r"did you mean 'ranking' \(an option of tracker top-norm\)"):
        build(make_model(), "adamw", rankng="max")
    with pytest.raises(ValueError, match=r"did you mean 'sign_beta' \(an option of inner rule sign-momentum\)"):
        build(make_model(), "sign-momentum", sign_bta=0.5)
    with pytest.raises(ValueError, match="belongs to inner rule sign-momentum"):
        build(make_model(), "adamw", sign_beta=0.5)


# ----------------------------------------------------------------------------------- training and checkpoints
@pytest.mark.parametrize("base", ["adamw", "sign-momentum"])
def test_train_checkpoint_and_resume_bit_exactly(registered, base):
    data = batches(20)
    model = make_model()
    opt = build(model, base, ranking="max")
    loss0 = nn.functional.mse_loss(model(data[0][0]), data[0][1]).item()
    train(model, opt, data[:12])
    state = opt.state[model.mid.weight]
    assert state["updates"] == state["tracker"]["tn_moves"] == 2
    assert opt.diagnostics()["weights"]["param1"]["tn_diag_share"] > 4 / 40  # better than 4 random rows of 40
    saved = roundtrip(opt.state_dict())
    expected = [p.detach().clone() for p in train(model, opt, data[12:]).parameters()]
    assert nn.functional.mse_loss(model(data[0][0]), data[0][1]).item() < loss0
    resumed = make_model()
    train(resumed, build(resumed, base, ranking="max"), data[:12])
    opt2 = build(resumed, base, ranking="max")
    opt2.load_state_dict(saved)
    train(resumed, opt2, data[12:])
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed.parameters()))
    with pytest.raises(ValueError, match="ranking"):  # a structural option of the tracker must match
        build(make_model(), base).load_state_dict(saved)
    with pytest.raises(ValueError, match="tracker"):  # another method's state is refused
        create_optimizer("galore", projected_groups(make_model(), rank=4, gap=5), base=base).load_state_dict(saved)


def test_the_new_rules_declared_state_is_what_reset_restarts(registered):
    model = make_model()
    opt = build(model, "sign-momentum")
    train(model, opt, batches(6))  # moves at step 5: "reset" restarts the rule's state
    state = opt.state[model.mid.weight]
    assert state["rule"]["sm_step"] == 1 and state["step"] == 6
    assert opt.state[model.head.weight]["rule"]["sm_step"] == 6  # full rank: never reset


# --------------------------------------------------------------------------------------------------- layer-wise
@pytest.mark.parametrize(("base", "accum"), [("adamw", 2), ("sign-momentum", 1)])
def test_layerwise_runs_the_new_components(registered, base, accum):
    """With accumulation (adamw: a sign would turn the rounding of S^T G1 + S^T G2 into full steps) the result
    matches the normal mode's to rounding; without it, bit for bit."""
    data = batches(12)
    ref = make_model()
    ref_opt = build(ref, base)
    for i in range(0, len(data), accum):
        for x, y in data[i : i + accum]:
            (nn.functional.mse_loss(ref(x), y) / accum).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    model = make_model()
    opt = build(model, base)
    lw = Layerwise(opt, accumulation_steps=accum)
    held = []
    for x, y in data:
        (nn.functional.mse_loss(model(x), y) / accum).backward()
        held.append(model.mid.weight.grad is not None)
    lw.remove()
    if accum == 1:
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
        assert held == [False] * len(data)
    else:
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # the full gradient is kept only before the first basis and before the move at step 5; every other window
        # accumulates S^T G (needs_every_gradient = False)
        assert held == [True, False] + [False] * 8 + [True, False]
    moves = opt.state[model.mid.weight]["tracker"]["tn_moves"]
    assert moves == ref_opt.state[ref.mid.weight]["tracker"]["tn_moves"] == 12 // accum // 5


# ------------------------------------------------------------------------------------ shard_updates, 2 processes
WORLD, STEPS = 2, 11


def _ddp_run(rank: int, base: str, mode: str | None, saved=None, start: int = 0, steps: int = STEPS):
    from torch.nn.parallel import DistributedDataParallel

    data = batches(STEPS, seed=7)
    model = DistributedDataParallel(make_model())
    kw = {"rank": 4, "update_proj_gap": 3, "target_modules": "all-linear", "base": base, "distributed": mode}
    opt = create_optimizer("topnorm", model.module, lr=1e-2, **kw)
    if saved is not None:
        model.module.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
    for x, y in data[start : start + steps]:
        part = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()
    return model.module, opt


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    register()  # a spawned process imports this file afresh: it registers the components itself
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for base in ("adamw", "sign-momentum"):
            for mode in (None, "shard_updates"):
                model, opt = _ddp_run(rank, base, mode)
                out[(base, mode)] = [p.detach().clone() for p in model.parameters()]
                out[(base, mode, "state")] = [
                    (st["tracker"]["tn_moves"], st["tracker"]["tn_diag_share"].clone())
                    for st in opt.state.values()
                    if "tn_moves" in st.get("tracker", {})
                ]
            model, opt = _ddp_run(rank, base, "shard_updates", steps=6)  # saved between the moves at 3 and 6
            saved = roundtrip((model.state_dict(), opt.state_dict()))
            model, _ = _ddp_run(rank, base, "shard_updates", saved=saved, start=6, steps=STEPS - 6)
            out[(base, "resumed")] = [p.detach().clone() for p in model.parameters()]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("extension"))
    mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("base", ["adamw", "sign-momentum"])
def test_shard_updates_give_the_replicated_bits_and_resume(runs, base):
    replicated, sharded = runs[0][(base, None)], runs[0][(base, "shard_updates")]
    assert all(torch.equal(a, b) for a, b in zip(replicated, sharded))
    assert all(torch.equal(a, b) for a, b in zip(sharded, runs[1][(base, "shard_updates")]))
    assert all(torch.equal(a, b) for a, b in zip(sharded, runs[0][(base, "resumed")]))
    for r in range(WORLD):  # the bookkeeping (on_update) and the diagnostics (broadcast) agree on every rank
        got, ref = runs[r][(base, "shard_updates", "state")], runs[0][(base, None, "state")]
        assert len(got) == len(ref) >= 3
        for (moves, share), (moves0, share0) in zip(got, ref):
            assert moves == moves0 == 3 and torch.equal(share, share0)  # moves at steps 3, 6, 9
    assert not torch.equal(sharded[0], make_model().up.weight)
