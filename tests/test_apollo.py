"""APOLLO and APOLLO-Mini against their update written out from the paper (arXiv:2412.05270, Algorithm 1) and the
reference package's formula (apollo-torch 1.0.3, ``APOLLOAdamW``; CC-BY-NC, so read, not depended on), in the
weight's own layout and with the same projection matrices; plus the frame's composition, the seam's errors and
the memory formula."""

import math

import pytest
import torch
from torch import nn

from conftest import batches, make_model, train
from gradspace import SubspaceOptimizer, create_optimizer
from gradspace.bench.memory import formula_bytes
from gradspace.optimizer import optimizer_state_bytes
from gradspace.projection import project
from gradspace.rules import get_rule
from gradspace.trackers import Context
from gradspace.trackers.gaussian import GaussianTracker
from gradspace.update import apply_update

SHAPES = {"up": (40, 24), "mid": (40, 40), "down": (24, 40)}  # m > n, m == n, m < n


def reference_apollo(model, data, *, rank, gap, scale, scale_type, lr=1e-2, wd=0.05, seed=0, eps=1e-6):
    """apollo-torch's step, written out for the three projected weights of ``make_model`` (every other parameter
    runs the same AdamW in full rank). Projection ``std``: ``R = G P^T`` with P (r x n) for m >= n, ``R = P^T G``
    with P (m x r) for m < n; channels along the larger side; ``update = sqrt(scale) * G * s`` after the limiter;
    step size ``lr sqrt(1 - b2^t) / (1 - b1^t)``; decoupled weight decay after the step. The P of draw d is
    gradspace's (same seed, parameter index and draw number): this checks the arithmetic, the draw schedule and
    the orientations, not the random stream."""
    b1, b2 = 0.9, 0.999
    params = [p for g in groups(model) for p in g["params"]]  # the optimizer's order: its parameter indices
    projected = {id(getattr(model, name).weight) for name in SHAPES}
    state = {id(p): {"m": None, "v": None, "limit": None} for p in params}
    for t, (x, y) in enumerate(data, start=1):
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for index, p in enumerate(params):
                st, g = state[id(p)], p.grad
                if id(p) in projected:
                    m, n = g.shape
                    right = m >= n
                    k = n if right else m
                    draw = GaussianTracker.draw(k, rank, Context(index, right, seed), (t - 1) // gap, g.device)
                    r_grad = g @ draw if right else draw.mT @ g  # (m x r) or (r x n)
                else:
                    r_grad = g
                if st["m"] is None:
                    st["m"], st["v"] = torch.zeros_like(r_grad), torch.zeros_like(r_grad)
                st["m"].mul_(b1).add_(r_grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(r_grad, r_grad, value=1 - b2)
                step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                norm_grad = st["m"] / (st["v"].sqrt() + eps)
                if id(p) in projected:
                    norm_dim = 0 if g.shape[0] < g.shape[1] else 1
                    if scale_type == "channel":
                        s = norm_grad.norm(dim=norm_dim) / (r_grad.norm(dim=norm_dim) + 1e-8)
                        s = s.unsqueeze(1) if norm_dim == 1 else s
                    else:
                        s = norm_grad.norm() / (r_grad.norm() + 1e-8)
                    scaled = g * s
                    norm = scaled.norm()
                    if st["limit"] is not None:
                        limiter = max(norm / (st["limit"] + 1e-8), 1.01) / 1.01
                        scaled, norm = scaled / limiter, norm / limiter
                    st["limit"] = norm
                    norm_grad = scaled * math.sqrt(scale)
                p.add_(norm_grad, alpha=-step)
                p.add_(p, alpha=-lr * wd)
    return model


def groups(model, **extra):
    weights = [getattr(model, name).weight for name in SHAPES]
    rest = [p for p in model.parameters() if all(p is not w for w in weights)]
    return [{"params": weights, **extra}, {"params": rest}]


def relative_diff(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("method", "rank", "scale", "scale_type"), [("apollo", 6, 1.0, "channel"), ("apollo-mini", 1, 128.0, "tensor")]
)
@pytest.mark.parametrize("steps", [1, 26])
def test_matches_the_written_out_update_across_redraws(method, rank, scale, scale_type, steps):
    """One step, and 26 steps at gap 10 (two redraws), on weights with m > n, m == n and m < n."""
    data = batches(steps)
    ref = reference_apollo(make_model(), data, rank=rank, gap=10, scale=scale, scale_type=scale_type)
    model = make_model()
    opt = create_optimizer(method, groups(model, rank=rank, update_proj_gap=10), lr=1e-2, weight_decay=0.05)
    train(model, opt, data)
    assert all(opt.state[getattr(model, n).weight]["updates"] == (steps - 1) // 10 for n in SHAPES)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert relative_diff(p.detach(), q.detach()) < 2e-6, name
    assert relative_diff(model.up.weight.detach(), make_model().up.weight.detach()) > 1e-3  # it trained


def test_presets_are_apollo_and_apollo_mini():
    model = make_model()
    opt = create_optimizer("apollo-mini", model, target_modules=["up", "mid", "down"])
    group = next(g for g in opt.param_groups if "rank" in g)
    assert (group["rank"], group["scale"], group["scale_type"], group["tracker"], group["output"]) == (
        1,
        128.0,
        "tensor",
        "gaussian",
        "scale",
    )
    opt = create_optimizer("apollo", model, target_modules=["up"], rank=16)
    group = next(g for g in opt.param_groups if "rank" in g)
    assert (group["rank"], group["scale"], group["scale_type"]) == (16, 1.0, "channel")
    # what the user gives wins over the preset's own settings
    opt = create_optimizer("apollo-mini", model, target_modules=["up"], rank=2, scale=64)
    group = next(g for g in opt.param_groups if "rank" in g)
    assert (group["rank"], group["scale"]) == (2, 64)


def test_the_step_is_tracker_then_rule_then_output():
    """The composition in one place: a projected step is the tracker's P, the inner rule on ``P^T G``, and the
    output seam; swapping the output seam (project back) changes only the last stage."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 30, dtype=torch.float64))  # float64: the column check below divides by G
    g = torch.randn(12, 30, dtype=torch.float64)
    start = w.detach().clone()
    for output in ("scale", "project"):
        w.data.copy_(start)
        w.grad = g.clone()
        opt = SubspaceOptimizer(
            [{"params": [w], "rank": 3}], lr=0.1, tracker="gaussian", output=output, scale=4.0, seed=7
        )
        opt.step()
        # by hand: tracker -> inner rule -> output
        basis = GaussianTracker().init(g, 3, {}, {}, Context(0, False, 7))
        gt = project(basis, g)  # float32, as the optimizer computes it for any parameter dtype
        state = {}
        rule = get_rule("adamw")
        rule.init_state(state, gt.to(w.dtype), opt.param_groups[0])  # moments in the parameter dtype
        direction, factor = rule.update(gt, state, opt.param_groups[0])
        expect = start.clone()
        apply_update(expect, basis, g, gt, direction, {}, opt.param_groups[0], right=False, step_size=-0.1 * factor)
        torch.testing.assert_close(w.detach(), expect, rtol=0, atol=1e-9)
        assert not torch.equal(w.detach(), start)
    # the two outputs differ, and the scaled one is along the raw gradient, column by column
    w.data.copy_(start)
    w.grad = g.clone()
    SubspaceOptimizer([{"params": [w], "rank": 3}], lr=0.1, tracker="gaussian", output="scale", seed=7).step()
    delta = (w.detach() - start) / g
    assert torch.allclose(delta, delta[:1].expand_as(delta), rtol=1e-9)  # one factor per column (channel)
    assert delta[0].std() > 1e-3 * delta[0].abs().mean()  # and the columns' factors differ


def test_every_inner_rule_runs_under_the_scaled_output():
    for base in ("adamw", "adamw8bit", "lion", "adafactor", "sgd"):
        model = make_model()
        opt = create_optimizer("apollo", groups(model, rank=4, update_proj_gap=5), lr=1e-3, base=base)
        before = model.up.weight.detach().clone()
        train(model, opt, batches(6))
        assert torch.isfinite(model.up.weight).all() and not torch.equal(model.up.weight.detach(), before), base


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"recovery": True}, "no residual"),
        ({"moments": "project"}, "orthonormal basis"),
        ({"moments": "rotate"}, "orthonormal basis"),
        ({"scale_type": "row"}, "scale_type"),
        ({"output": "scaled"}, "unknown output"),
    ],
)
def test_combinations_that_do_not_exist_are_errors(options, words):
    with pytest.raises(ValueError, match=words):
        create_optimizer("apollo", make_model(), target_modules=["up"], rank=4, **options)


def test_the_projection_is_deterministic_per_parameter_and_resumable():
    data = batches(14)
    a, b = make_model(), make_model()
    opt_a = create_optimizer("apollo", groups(a, rank=4, update_proj_gap=5), seed=3)
    train(a, opt_a, data)
    opt_b = create_optimizer("apollo", groups(b, rank=4, update_proj_gap=5), seed=3)
    train(b, opt_b, data[:7])
    saved = opt_b.state_dict()
    opt_b = create_optimizer("apollo", groups(b, rank=4, update_proj_gap=5), seed=3)
    opt_b.load_state_dict(saved)
    train(b, opt_b, data[7:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    bases = [opt_a.state[getattr(a, n).weight]["basis"] for n in ("up", "down")]
    assert not torch.equal(bases[0][:, :1], bases[1][:, :1])  # each weight draws its own
    # N(0, 1/r), not orthonormalised
    p = GaussianTracker.draw(4000, 4, Context(0, False, 0), 0, torch.device("cpu"))
    assert abs(float(p.var()) - 0.25) < 0.01 and abs(float(p[:, 0] @ p[:, 1])) > 1e-3


def test_state_is_the_formula_and_apollo_mini_holds_two_1_x_n_moments():
    model = nn.ModuleDict({"attn": nn.Linear(64, 256), "mlp": nn.Linear(256, 64)})
    for method, rank in (("apollo", 8), ("apollo-mini", 1)):
        opt = create_optimizer(method, model, rank=rank)
        model["mlp"](model["attn"](torch.randn(4, 64))).sum().backward()
        opt.step()
        assert optimizer_state_bytes(opt) == formula_bytes(model, method, rank, {}), method
        if method == "apollo-mini":
            st = opt.state[model["attn"].weight]
            assert st["rule"]["exp_avg"].shape == st["rule"]["exp_avg_sq"].shape == (1, 256)
            assert st["basis"].shape == (64, 1)
        model.zero_grad()


def test_captured_energy_of_a_gaussian_projection_is_the_share_in_its_span():
    """``||P^T G||^2 / ||G||^2`` is about 1 whatever P captures; the diagnostic is the energy of G's projection
    onto span(P), computed here with an orthonormal basis of that span."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(20, 50))
    w.grad = torch.randn(20, 50)
    opt = SubspaceOptimizer([{"params": [w], "rank": 4}], tracker="gaussian", output="scale")
    opt.step()
    q = torch.linalg.qr(opt.state[w]["basis"]).Q
    expect = float((q.mT @ w.grad).square().sum() / w.grad.square().sum())
    assert opt.diagnostics()["weights"]["param0"]["energy"] == pytest.approx(expect, rel=1e-5)
    assert expect < 0.5  # 4 of 20 directions of a random gradient: far from the ~1 of ||P^T G||^2 / ||G||^2
