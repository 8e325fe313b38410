"""A parameter's optimizer state is nested by owner (gradspace.components): each component gets its own part,
and a state dict in the earlier flat layout is refused with an error that says what to do."""

import pytest
import torch

from conftest import batches, make_model, projected_groups, train
from gradspace import SubspaceOptimizer, create_optimizer
from gradspace.components import TrackerState, flat_items, set_flat


def test_each_component_holds_its_own_part_and_the_core_holds_the_clock_and_basis():
    model = make_model()
    opt = create_optimizer("subtrack++", projected_groups(model, rank=4, gap=3), lr=1e-2)
    train(model, opt, batches(4))
    st = opt.state[model.mid.weight]
    assert {"step", "updates", "basis"} <= set(st)
    assert set(st["rule"]) == {"exp_avg", "exp_avg_sq", "exp_step"}  # AdamW's, and nothing else
    assert set(st["tracker"]) == {"trk_acc", "trk_count"}  # SubTrack's gradient window
    assert set(st["output"]) == {"rec_norm"}  # recovery's limiter
    full = opt.state[model.head.bias]
    assert set(full) == {"step", "rule"}  # full rank: a step counter and the rule's part only


def test_a_tracker_reads_the_clock_and_basis_but_writes_only_its_part():
    core = {"step": 7, "updates": 2, "basis": torch.eye(3)}
    own = TrackerState(core)
    own["acc"] = 1
    assert (own.step, own.updates, own.phase) == (7, 2, 0) and own.basis is core["basis"]
    assert core["tracker"] == {"acc": 1} and set(own) == {"acc"}
    with pytest.raises(AttributeError):
        own.step = 8  # the clock is the optimizer's
    with pytest.raises(KeyError):
        own["step"]  # not the tracker's key


def test_flat_items_and_set_flat_are_inverse():
    st = {"step": 3, "rule": {"exp_avg": torch.ones(2)}, "tracker": {}}
    flat = dict(flat_items(st))
    assert set(flat) == {"step", "rule.exp_avg"}  # leaves only: an empty part is the same state as a missing one
    back = {}
    for k, v in flat.items():
        set_flat(back, k, v)
    assert back.keys() == {"step", "rule"} and torch.equal(back["rule"]["exp_avg"], st["rule"]["exp_avg"])


def test_a_state_without_its_empty_parts_steps_as_before():
    """A DCP checkpoint stores leaves only, so a loaded state lacks the empty parts (a tracker without
    state, no norm-growth limiter): the optimizer makes them again on use, and the step is the same."""
    torch.manual_seed(0)
    model, twin = make_model(), make_model()
    twin.load_state_dict(model.state_dict())
    opts = [SubspaceOptimizer(projected_groups(m, rank=4, gap=3), lr=1e-2, base="sgd") for m in (model, twin)]
    for m, o in zip((model, twin), opts):
        train(m, o, batches(2))
    sd = opts[1].state_dict()
    assert any(st.get("tracker") == {} and st.get("output") == {} for st in sd["state"].values())  # SVD, no limiter
    for st in sd["state"].values():
        for owner in [k for k, v in st.items() if v == {}]:
            del st[owner]
    opts[1].load_state_dict(sd)
    for m, o in zip((model, twin), opts):
        train(m, o, batches(2, seed=5))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_state_dict_in_the_flat_layout_is_refused_saying_what_to_do():
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, rank=4, gap=3), lr=1e-2)
    train(model, opt, batches(2))
    sd = opt.state_dict()
    flat = {**sd, "gradspace": {k: v for k, v in sd["gradspace"].items() if k != "state_format"}}
    flat["state"] = {i: dict(flat_items(st)) for i, st in sd["state"].items()}  # what an earlier version wrote
    fresh = SubspaceOptimizer(projected_groups(make_model(), rank=4, gap=3), lr=1e-2)
    with pytest.raises(ValueError, match=r"state format 1.*start a new run"):
        fresh.load_state_dict(flat)
    fresh.load_state_dict(sd)  # the nested one loads
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["basis"], sd["state"][0]["basis"])
