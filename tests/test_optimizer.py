"""SubspaceOptimizer: checkpoints, bad input, torch.optim conventions."""

import copy
import io
import logging

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups, train
from gradspace import SubspaceOptimizer, create_optimizer, optimizer_state_bytes
from gradspace.components import flat_items

PROJECTED = ("up", "mid", "down")


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def only_tensors_and_numbers(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and only_tensors_and_numbers(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(only_tensors_and_numbers(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, int, float, bool, str))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("stop_at", [20, 27])  # exactly at a subspace update (gap 10), and between two
def test_resume_is_bit_identical(stop_at):
    data = batches(45)
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, gap=10), lr=1e-2, weight_decay=0.1)
    train(model, opt, data)
    expected = snapshot(model)

    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, gap=10), lr=1e-2, weight_decay=0.1)
    train(model, opt, data[:stop_at])
    saved_model = roundtrip(model.state_dict())
    saved_opt = roundtrip(opt.state_dict())
    assert only_tensors_and_numbers(saved_opt["state"])

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = SubspaceOptimizer(projected_groups(resumed, gap=10), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[stop_at:])
    for a, b in zip(snapshot(resumed), expected):
        assert torch.equal(a, b)


def test_bf16_basis_is_float32_and_state_dtypes_survive_loading():
    data = batches(12)
    model = make_model(dtype=torch.bfloat16)
    opt = SubspaceOptimizer(projected_groups(model, gap=5), lr=1e-2, state_dtype="float32")
    train(model, opt, data, dtype=torch.bfloat16)
    st = opt.state[model.up.weight]
    assert st["basis"].dtype == torch.float32
    assert st["rule"]["exp_avg"].dtype == torch.float32
    before = {k: v.dtype for k, v in flat_items(st) if isinstance(v, torch.Tensor)}
    assert {"basis", "rule.exp_avg", "rule.exp_avg_sq"} <= before.keys()

    model2 = copy.deepcopy(model)
    opt2 = SubspaceOptimizer(projected_groups(model2, gap=5), lr=1e-2, state_dtype="float32")
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    after = {k: v.dtype for k, v in flat_items(opt2.state[model2.up.weight]) if isinstance(v, torch.Tensor)}
    assert after == before
    assert torch.equal(opt2.state[model2.up.weight]["basis"], st["basis"])  # no lossy cast on the way


def test_bf16_default_state_dtype_follows_param():
    model = make_model(dtype=torch.bfloat16)
    opt = SubspaceOptimizer(projected_groups(model, gap=5), lr=1e-2)
    train(model, opt, batches(3), dtype=torch.bfloat16)
    st = opt.state[model.down.weight]
    assert st["basis"].dtype == torch.float32 and st["rule"]["exp_avg"].dtype == torch.bfloat16
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


def test_loading_a_checkpoint_for_another_model_fails_clearly():
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model), lr=1e-2)
    train(model, opt, batches(2))
    other = nn.Linear(3, 5)
    opt2 = SubspaceOptimizer([{"params": [other.weight], "rank": 2}, {"params": [other.bias]}], lr=1e-2)
    with pytest.raises(ValueError, match="parameters"):
        opt2.load_state_dict(opt.state_dict())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "group_extra, message",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"proj_type": "diagonal"}, "proj_type"),
    ],
)
def test_bad_projection_settings_raise(group_extra, message):
    model = make_model()
    groups = projected_groups(model)
    groups[0].update(group_extra)
    with pytest.raises(ValueError, match=message):
        SubspaceOptimizer(groups, lr=1e-3)


def test_negative_lr_and_unknown_names_raise():
    model = make_model()
    with pytest.raises(ValueError, match="lr"):
        SubspaceOptimizer(projected_groups(model), lr=-1.0)
    with pytest.raises(ValueError, match="galore"):
        create_optimizer("galora", model)
    with pytest.raises(ValueError, match="tracker"):
        SubspaceOptimizer(projected_groups(model), tracker="nope")
    with pytest.raises(ValueError, match="inner rule"):
        SubspaceOptimizer(projected_groups(model), base="adamz")
    with pytest.raises(ValueError, match="unknown option"):
        SubspaceOptimizer(projected_groups(model), betaz=(0.9, 0.9))


def _complex(*shape):
    return nn.Parameter(torch.randn(*shape, dtype=torch.complex64))


@pytest.mark.parametrize("projected", [True, False])
def test_a_complex_parameter_is_an_error_in_any_group(projected):
    """It used to train on its real part in a projected group (and fail at the first step in a full-rank one)."""
    extra = {"rank": 2} if projected else {}
    with pytest.raises(ValueError, match=r"^w has dtype torch.complex64; gradspace supports real floating-point"):
        SubspaceOptimizer([{"params": [("w", _complex(8, 16))], **extra}])
    with pytest.raises(ValueError, match=r"param 0 of param group 1 \(shape \(8, 16\)\) has dtype torch.complex64"):
        SubspaceOptimizer([{"params": make_model().parameters()}, {"params": [_complex(8, 16)], **extra}])


def test_non_2d_target_raises():
    model = make_model()
    with pytest.raises(ValueError, match="only 2-D"):
        SubspaceOptimizer([{"params": [model.up.bias], "rank": 4}], lr=1e-3)


def test_sparse_gradient_raises_before_anything_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SubspaceOptimizer([{"params": [emb.weight]}], lr=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state


def _grads(model, data):
    x, y = data
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def test_nonfinite_gradient_errors_naming_the_param_and_changes_nothing():
    model = make_model()
    opt = create_optimizer("galore", model, lr=1e-2, rank=4, target_modules=["up", "mid", "down"])
    data = batches(3)
    train(model, opt, data[:2])
    params, state = snapshot(model), copy.deepcopy(opt.state_dict())
    _grads(model, data[2])
    model.mid.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"mid.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), params))
    after = opt.state_dict()
    for pid, st in state["state"].items():
        now = dict(flat_items(after["state"][pid]))
        for k, v in flat_items(st):
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(now[k]))


def test_nonfinite_skip_mode_skips_whole_step_and_counts_it():
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, gap=2), lr=1e-2, nonfinite="skip")
    data = batches(3)
    train(model, opt, data[:2])
    params = snapshot(model)
    steps = {p: opt.state[p]["step"] for p in model.parameters()}
    _grads(model, data[2])
    model.head.bias.grad[0] = float("inf")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), params))
    assert all(opt.state[p]["step"] == steps[p] for p in model.parameters())
    assert opt.diagnostics()["skipped_steps"] == 1


def test_rank_at_least_min_side_warns_once_and_trains_full_rank(caplog):
    model = make_model()
    groups = projected_groups(model, rank=30)  # down is 24 x 40: clipped; up (40x24) too; mid (40x40) projected
    with caplog.at_level(logging.WARNING, logger="gradspace"):
        opt = SubspaceOptimizer(groups, lr=1e-2)
        train(model, opt, batches(3))
    warnings = [r for r in caplog.records if "full rank" in r.getMessage()]
    assert len(warnings) == 1
    assert "basis" not in opt.state[model.down.weight]
    assert opt.state[model.mid.weight]["basis"].shape == (40, 30)


def test_svd_failure_falls_back_to_gram_eigensolve(monkeypatch):
    from gradspace.trackers import svd

    g = torch.randn(20, 50)
    expected = svd.top_singular_basis(g, 5, right=False)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    got = svd.top_singular_basis(g, 5, right=False)
    # same subspace (signs may differ)
    assert torch.allclose((got.T @ expected).abs(), torch.eye(5), atol=1e-4)


# ----------------------------------------------------------------------------- torch.optim conventions
def test_closure_and_none_grads():
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model), lr=1e-2)
    x, y = batches(1)[0]
    model.head.requires_grad_(False)
    before = model.head.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(model.head.weight, before)
    assert model.head.weight not in opt.state
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    snap = snapshot(model)
    opt.step()  # no gradients: a no-op
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), snap))


def test_per_group_lr_and_weight_decay():
    model = make_model()
    groups = projected_groups(model)
    groups[0]["lr"] = 0.0
    groups[1]["weight_decay"] = 0.5
    opt = SubspaceOptimizer(groups, lr=1e-2)
    frozen = [p.detach().clone() for p in groups[0]["params"]]
    train(model, opt, batches(3))
    assert all(torch.equal(a, b) for a, b in zip(groups[0]["params"], frozen))
    assert opt.param_groups[1]["weight_decay"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.0


def test_deepcopy_and_add_param_group():
    model = make_model()
    groups = projected_groups(model)
    extra = nn.Linear(16, 32)
    opt = SubspaceOptimizer(groups[:1], lr=1e-2)
    opt.add_param_group(groups[1])
    opt.add_param_group({"params": [extra.weight], "rank": 4})
    assert opt.param_groups[2]["update_proj_gap"] == 200 and opt.param_groups[2]["tracker"] == "svd"
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [extra.bias], "rank": 0})
    train(model, opt, batches(2))
    twin = copy.deepcopy(opt)
    assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert optimizer_state_bytes(twin) == optimizer_state_bytes(opt) > 0


def test_add_param_group_takes_plain_tensors_after_create_optimizer():
    """create_optimizer names its groups; a user adding plain tensors, as with torch.optim, used to get torch's
    "cannot add param group without names"."""
    model, extra = make_model(), nn.Linear(16, 32)
    opt = create_optimizer("galore", model, lr=1e-2, rank=4, target_modules=PROJECTED)
    opt.add_param_group({"params": [extra.weight], "rank": 4})
    opt.add_param_group({"params": extra.bias})
    count = len(list(model.parameters()))
    assert opt.param_groups[-2]["param_names"] == [f"param{count}"]
    assert opt.param_groups[-1]["param_names"] == [f"param{count + 1}"]
    train(model, opt, batches(2))
    extra.weight.grad, extra.bias.grad = torch.randn(32, 16), torch.randn(32)
    opt.step()
    assert opt.state[extra.weight]["basis"].shape == (16, 4) and f"param{count}" in opt.diagnostics()["weights"]
    unnamed = SubspaceOptimizer(model.parameters())
    with pytest.raises(ValueError, match="its other groups have none, so pass this group's tensors without names"):
        unnamed.add_param_group({"params": [("extra.weight", extra.weight)]})


def _frozen(opt):
    sd = opt.state_dict()
    groups = [{**g, "params": [id(p) for p in g["params"]]} for g in opt.param_groups]
    return groups, {k: {n: torch.as_tensor(v).clone() for n, v in flat_items(st)} for k, st in sd["state"].items()}


def test_a_rejected_add_param_group_leaves_the_optimizer_as_it_was(caplog):
    model, extra = make_model(), nn.Linear(16, 32)
    opt = create_optimizer("galore", model, lr=1e-2, rank=4, target_modules=PROJECTED)
    train(model, opt, batches(2))
    before = _frozen(opt)
    rejected = [
        ({"params": [extra.weight], "rank": 0}, "rank must be a positive integer"),
        ({"params": [extra.weight], "betas": (1.5, 0.9)}, "betas"),
        ({"params": [extra.weight, _complex(4)]}, "complex"),
        ({"params": [_complex(16, 32)], "rank": 4}, "complex"),
        ({"params": [extra.weight, model.up.weight]}, "more than one parameter group"),
        ({"params": [nn.Linear(2, 3).weight, extra.bias], "rank": 4}, "bias|2-D|flatten"),  # clipped, then 1-D
    ]
    for group, message in rejected:
        with pytest.raises(ValueError, match=message):
            opt.add_param_group(group)
        groups, state = _frozen(opt)
        assert groups == before[0] and state.keys() == before[1].keys()
        assert all(torch.equal(state[k][n], v) for k in state for n, v in before[1][k].items())
    with caplog.at_level(logging.WARNING, logger="gradspace"):
        opt.add_param_group({"params": [extra.weight], "rank": 16})  # added later: warned then, and only for itself
    (record,) = [r for r in caplog.records if "full rank" in r.getMessage()]
    assert "1 weight(s)" in record.getMessage() and "(32, 16)" in record.getMessage()


def test_state_bytes_equal_the_formula():
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, rank=6), lr=1e-2)
    train(model, opt, batches(1))
    # projected: basis (k x r) + two moments (r x l); float32 everywhere here
    expected = 0
    for w in (model.up.weight, model.mid.weight, model.down.weight):
        k, l = min(w.shape), max(w.shape)
        expected += 4 * (k * 6 + 2 * 6 * l)
    expected += 4 * 2 * sum(p.numel() for n, p in model.named_parameters() if not n.endswith(PROJECTED_W))
    assert optimizer_state_bytes(opt) == expected


PROJECTED_W = tuple(f"{n}.weight" for n in PROJECTED)


def test_diagnostics_report_rank_energy_and_updates():
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, gap=5), lr=1e-2)
    train(model, opt, batches(11))
    diag = opt.diagnostics()
    w = diag["weights"]
    assert len(w) == 3
    for d in w.values():
        assert d["rank"] == 6 and d["updates"] == 2
        assert 0.0 < d["energy"] <= 1.0 + 1e-6
        assert d["angle"] is not None and 0.0 <= d["angle"] <= 1.5708
        assert d["state_bytes"] > 0
