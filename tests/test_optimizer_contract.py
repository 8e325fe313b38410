"""torch.optim's contract, as a user switching from torch.optim.AdamW or galore-torch relies on it: named
parameters, float64, validation order, state_dict / load_state_dict hooks, refusing incompatible checkpoints,
param-group keys, state dtypes, resized parameters."""

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups, train
from gradspace import METHODS, SubspaceOptimizer, create_optimizer
from gradspace.rules import get_rule
from test_optimizer import roundtrip


def trained(method="galore", steps=3, **kw):
    model = make_model()
    opt = create_optimizer(
        method, projected_groups(model, rank=4, gap=2) if METHODS[method] else model.parameters(), lr=1e-2, **kw
    )
    train(model, opt, batches(steps))
    return model, opt


# ------------------------------------------------------------------------------------------ named parameters
def test_named_parameters_work_as_in_torch():
    model = make_model()
    opt = SubspaceOptimizer(model.named_parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    train(model, opt, batches(2))
    reference = make_model()
    ref_opt = SubspaceOptimizer(reference.parameters(), lr=1e-2)
    train(reference, ref_opt, batches(2))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert opt.state_dict()["param_groups"][0]["param_names"][0] == "up.weight"


def test_named_parameter_groups_project_and_name_diagnostics_and_errors():
    model = make_model()
    named = dict(model.named_parameters())
    projected = [(n, named[n]) for n in ("up.weight", "mid.weight", "down.weight")]
    rest = [(n, p) for n, p in named.items() if n not in dict(projected)]
    opt = create_optimizer("galore", [{"params": projected, "rank": 4}, {"params": rest}], lr=1e-2)
    train(model, opt, batches(2))
    assert set(opt.diagnostics()["weights"]) == {"up.weight", "mid.weight", "down.weight"}
    with pytest.raises(ValueError, match=r"up.bias"):  # a 1-D param in a projected group is named
        create_optimizer("galore", [{"params": [("up.bias", model.up.bias)], "rank": 4}])
    with pytest.raises(ValueError, match="with/without names"):
        SubspaceOptimizer([("up.weight", model.up.weight), model.mid.weight])
    model.up.weight.grad = torch.full_like(model.up.weight, float("nan"))
    with pytest.raises(FloatingPointError, match=r"up.weight"):
        opt.step()


# ------------------------------------------------------------------------------------------------ float64
@pytest.mark.parametrize("method", list(METHODS))
def test_float64_parameters_train_with_every_preset(method):
    model = make_model(dtype=torch.float64)
    groups = projected_groups(model, rank=4, gap=3) if METHODS[method] else model.parameters()
    opt = create_optimizer(method, groups, lr=1e-2, weight_decay=0.01)
    data = batches(12)
    first = nn.functional.mse_loss(model(data[0][0].double()), data[0][1].double()).item()
    train(model, opt, data, dtype=torch.float64)
    last = nn.functional.mse_loss(model(data[0][0].double()), data[0][1].double()).item()
    assert all(p.dtype == torch.float64 and p.isfinite().all() for p in model.parameters())
    assert last < first
    if METHODS[method] and METHODS[method]["tracker"] != "online_pca":  # OSD moves P every step instead
        assert opt.state[model.mid.weight]["updates"] >= 1


# ---------------------------------------------------------------------------------------------- validation
def test_lr_and_weight_decay_are_validated_first_with_value_errors():
    with pytest.raises(ValueError, match="weight_decay"):
        SubspaceOptimizer(make_model().parameters(), weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        SubspaceOptimizer([{"params": make_model().parameters(), "weight_decay": -1.0}])
    with pytest.raises(ValueError, match="learning rate"):
        SubspaceOptimizer([], lr=-1.0)  # before "empty parameter list", as torch.optim.AdamW
    with pytest.raises(ValueError, match="learning rate"):
        SubspaceOptimizer(make_model().parameters(), lr=float("nan"))
    with pytest.raises(ValueError, match="1-element"):
        SubspaceOptimizer(make_model().parameters(), lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="betas"):
        SubspaceOptimizer(None, betas=(1.5, 0.9))  # hyperparameters before params, as torch.optim.AdamW


@pytest.mark.parametrize(
    "key, intended",
    [
        ("updte_proj_gap", "update_proj_gap"),
        ("projection_type", "proj_type"),
        ("ranks", "rank"),
        ("weight_decy", "weight_decay"),
        ("sclae", "scale"),
    ],
)
def test_a_near_miss_group_key_names_the_intended_one(key, intended):
    model = make_model()
    groups = projected_groups(model)
    groups[0][key] = 5
    with pytest.raises(ValueError, match=f"did you mean '{intended}'"):
        SubspaceOptimizer(groups)


def test_keys_that_torch_schedulers_and_trainers_add_are_accepted():
    model, opt = trained()
    groups = projected_groups(make_model())
    for g in groups:
        g.update(initial_lr=1e-3, max_lr=1e-2, base_momentum=0.85, max_momentum=0.95, layer_id=3, name="block")
    SubspaceOptimizer(groups)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=False)
    train(model, opt, batches(2))
    scheduler.step()
    assert "initial_lr" in opt.param_groups[0] and "max_lr" in opt.param_groups[0]


# ---------------------------------------------------------------------------------------- LR schedulers
def cycling(scheduler, opt, steps):
    """A momentum-cycling scheduler at its defaults (cycle_momentum=True): it needs ``betas`` in ``defaults``."""
    if scheduler == "OneCycleLR":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=4)


def scheduled(opt, model, data, scheduler=None):
    """Train, stepping the scheduler after each step; returns the beta1 of every step."""
    used = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        used.append(opt.param_groups[0]["betas"][0])
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return used


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_momentum_cycling_schedulers_drive_the_betas_as_with_torch_adamw(scheduler):
    """The adamw preset against torch.optim.AdamW under the same scheduler (eps ~0, where the HF form and torch's
    agree): the same beta1 every step and the same weights; cycling moved them, so the betas were read."""
    data = batches(12)
    reference = make_model()
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, eps=1e-12, weight_decay=0.0)
    torch_betas = scheduled(torch_opt, reference, data, cycling(scheduler, torch_opt, len(data)))
    model = make_model()
    opt = create_optimizer("adamw", model.parameters(), lr=1e-3, eps=1e-12)
    assert opt.defaults["betas"] == (0.9, 0.999)
    betas = scheduled(opt, model, data, cycling(scheduler, opt, len(data)))
    assert betas == torch_betas and len(set(betas)) > 3
    for p, q in zip(model.parameters(), reference.parameters()):
        assert float((p - q).detach().norm() / q.detach().norm()) < 1e-6
    fixed = make_model()
    opt = create_optimizer("adamw", fixed.parameters(), lr=1e-3, eps=1e-12)
    sched = cycling(scheduler, opt, len(data))
    sched.cycle_momentum = False  # the same learning rates, beta1 no longer cycled
    scheduled(opt, fixed, data, sched)
    assert float((fixed.up.weight - model.up.weight).detach().norm() / model.up.weight.detach().norm()) > 1e-4


@pytest.mark.parametrize(
    ("base", "key"), [("adamw", "betas"), ("adamw8bit", "betas"), ("lion", "betas"), ("sgd", "momentum")]
)
def test_the_inner_rules_hyperparameters_are_defaults_as_in_torch_optim(base, key):
    opt = create_optimizer("galore", projected_groups(make_model()), base=base)
    assert opt.defaults[key] == opt.param_groups[0][key] == get_rule(base).defaults[key]
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # cycle_momentum at its default
    assert opt.param_groups[0][key] != get_rule(base).defaults[key]
    # a group with its own rule keeps that rule's defaults, not those of the optimizer's rule
    lion = SubspaceOptimizer([{"params": make_model().parameters(), "base": "lion"}])
    assert lion.param_groups[0]["betas"] == (0.9, 0.99)


# --------------------------------------------------------------------------------------------- state dicts
def test_state_dict_post_hooks_see_the_whole_dict():
    _, opt = trained()
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(keys=set(sd)))
    opt.state_dict()
    assert seen["keys"] == {"state", "param_groups", "gradspace"}


def test_load_state_dict_pre_hooks_see_and_change_the_real_state_and_post_hooks_see_it_loaded():
    _, opt = trained()
    saved = roundtrip(opt.state_dict())
    model = make_model()
    fresh = create_optimizer("galore", projected_groups(model, rank=4, gap=2), lr=1e-2)
    seen = {}

    def pre(o, sd):
        seen["states"] = len(sd["state"])
        sd = dict(sd)
        sd["param_groups"] = [{**g, "lr": 0.5} for g in sd["param_groups"]]
        return sd

    def post(o):
        seen["bases"] = sum("basis" in st for st in o.state.values())

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(saved)
    assert seen == {"states": len(opt.state), "bases": 3}
    assert all(g["lr"] == 0.5 for g in fresh.param_groups)


def test_non_parameter_state_keys_survive_a_round_trip():
    _, opt = trained()
    opt.state["ema_decay"] = {"value": 0.99}
    fresh = create_optimizer("galore", projected_groups(make_model(), rank=4, gap=2), lr=1e-2)
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert fresh.state["ema_decay"] == {"value": 0.99}


@pytest.mark.parametrize(
    "saved, loading, message",
    [
        (("galore", {"rank": 16}), ("subtrack", {"rank": 8}), "tracker"),
        (("subtrack", {"rank": 4}), ("subtrack", {"rank": 8}), "rank"),
        (("galore", {"base": "adafactor"}), ("galore", {"base": "adamw"}), "base"),
        (("adamw", {"base": "adafactor"}), ("adamw", {}), "base"),
        (("galore", {}), ("fira", {}), "recovery"),
        (("subtrack", {}), ("subtrack++", {}), "moments"),
        (("osd", {}), ("osd-code", {}), "p_lr_mode"),
        (("galore", {}), ("adamw", {}), "parameter groups"),
    ],
)
def test_loading_a_state_of_another_method_rule_or_rank_is_a_clear_error(saved, loading, message):
    def build(method, kw):
        model = make_model()
        kw = dict(kw)
        rank = kw.pop("rank", 4)
        groups = projected_groups(model, rank=rank, gap=2) if METHODS[method] else model.parameters()
        return model, create_optimizer(method, groups, lr=1e-2, **kw)

    model, opt = build(*saved)
    train(model, opt, batches(3))
    _, other = build(*loading)
    before = [dict(g, params=None) for g in other.param_groups]
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(roundtrip(opt.state_dict()))
    assert [dict(g, params=None) for g in other.param_groups] == before and not other.state  # nothing changed


def test_old_checkpoint_without_new_group_keys_loads_with_this_runs_values():
    _model, opt = trained("fira")
    saved = roundtrip(opt.state_dict())
    for g in saved["param_groups"]:
        g.pop("recovery_residual", None)
    fresh = create_optimizer("fira", projected_groups(make_model(), rank=4, gap=2), lr=1e-2)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["recovery_residual"] == "scaled"


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("method", ["adamw", "galore"])
def test_state_dtype_reaches_full_rank_parameters(method):
    model = make_model(dtype=torch.bfloat16)
    groups = projected_groups(model, rank=4) if METHODS[method] else model.parameters()
    opt = create_optimizer(method, groups, lr=1e-2, state_dtype="float32")
    train(model, opt, batches(2), dtype=torch.bfloat16)
    for p in (model.head.weight, model.norm.weight, model.up.bias):
        assert opt.state[p]["rule"]["exp_avg"].dtype == torch.float32, p.shape
    with pytest.raises(ValueError, match="state_dtype"):
        create_optimizer(
            method,
            make_model().parameters() if not METHODS[method] else projected_groups(make_model()),
            state_dtype="int8",
        )


# ------------------------------------------------------------------------------------------- resized params
@pytest.mark.parametrize("which", ["head", "mid"])  # a full-rank (fused kernel) and a projected weight
def test_a_parameter_resized_after_its_state_was_made_is_a_clear_error(which):
    model, opt = trained()
    p = getattr(model, which).weight
    p.data = torch.randn(p.shape[0] + 3, p.shape[1])
    p.grad = torch.randn_like(p)
    before = [q.detach().clone() for q in model.parameters()]
    with pytest.raises(RuntimeError, match="changed shape"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
