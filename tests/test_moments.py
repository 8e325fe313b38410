"""Moment policies and recovery scaling equal their formulas computed directly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradspace import create_optimizer
from gradspace.moments import apply_policy
from gradspace.recovery import add_scaled_gradient, recovery_scales
from gradspace.rules import get_rule


def orthonormal(k, r, gen):
    return torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64)).Q.float()


def adam_state(r, l, t, gen):
    m = torch.randn(r, l, generator=gen)
    v = torch.rand(r, l, generator=gen) + m.square()  # a plausible second moment: v >= m^2
    return {"exp_avg": m.clone(), "exp_avg_sq": v.clone(), "exp_step": t}, m, v


GROUP = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(6, 20),
    r_old=st.integers(1, 5),
    r_new=st.integers(1, 5),
    t=st.integers(1, 500),
    seed=st.integers(0, 10_000),
)
def test_rotate_and_project_match_formulas_and_keep_v_nonnegative(k, r_old, r_new, t, seed):
    gen = torch.Generator().manual_seed(seed)
    old, new = orthonormal(k, r_old, gen), orthonormal(k, r_new, gen)
    c = new.T @ old
    like = torch.empty(r_new, 7)
    rule = get_rule("adamw")

    state, m, v = adam_state(r_old, 7, t, gen)
    apply_policy("rotate", rule, state, old, new, like, GROUP)
    assert torch.allclose(state["exp_avg"], c @ m, atol=1e-5)
    assert torch.allclose(state["exp_avg_sq"], (c * c) @ v, atol=1e-5)
    assert (state["exp_avg_sq"] >= 0).all()

    state, m, v = adam_state(r_old, 7, t, gen)
    apply_policy("project", rule, state, old, new, like, GROUP)
    bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
    m_hat, v_hat = m / bc1, v / bc2
    expected_v = bc2 * ((c * c) @ (v_hat - m_hat**2) + (c @ m_hat) ** 2).abs()
    assert torch.allclose(state["exp_avg"], c @ m, atol=1e-5)
    assert torch.allclose(state["exp_avg_sq"], expected_v, rtol=1e-4, atol=1e-5)
    assert (state["exp_avg_sq"] >= 0).all()


def test_reset_zeroes_moments_and_restarts_bias_correction():
    gen = torch.Generator().manual_seed(0)
    old, new = orthonormal(10, 3, gen), orthonormal(10, 4, gen)
    state, _, _ = adam_state(3, 5, 40, gen)
    apply_policy("reset", get_rule("adamw"), state, old, new, torch.empty(4, 5), GROUP)
    assert state["exp_step"] == 0 and state["exp_avg"].shape == (4, 5)
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_keep_leaves_state_untouched_and_refuses_a_rank_change():
    gen = torch.Generator().manual_seed(0)
    old, new = orthonormal(10, 3, gen), orthonormal(10, 3, gen)
    state, m, v = adam_state(3, 5, 4, gen)
    apply_policy("keep", get_rule("adamw"), state, old, new, torch.empty(3, 5), GROUP)
    assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)
    with pytest.raises(ValueError, match="rank change"):
        apply_policy("keep", get_rule("adamw"), state, old, orthonormal(10, 2, gen), torch.empty(2, 5), GROUP)


def _recovered_update(g, gt, s, ot, state, right, gram=None):
    """What the optimizer adds (before alpha): c * Gn + S (Ot - c Gt), in the weight's layout."""
    c = recovery_scales(g, gt, ot, state, {"recovery_limit": 1.01}, gram)
    p = torch.zeros(g.shape[::-1] if right else g.shape)
    add_scaled_gradient(p, g, c, right, 1.0)
    back = s @ (ot - c * gt)
    return p + (back.T if right else back)


@pytest.mark.parametrize("right", [False, True])
def test_recovery_equals_the_formula_and_limits_growth(right):
    gen = torch.Generator().manual_seed(0)
    k, l, r = 12, 20, 3
    s = orthonormal(k, r, gen)
    g = torch.randn(k, l, generator=gen)
    gt = s.T @ g
    ot = torch.randn(r, l, generator=gen)
    phi = ot.norm(dim=0) / (gt.norm(dim=0) + 1e-8)
    term = (g - s @ gt) * phi  # Fira's scaled residual, formed explicitly
    layout = (lambda x: x.T) if right else (lambda x: x)
    state = {}
    assert torch.allclose(_recovered_update(g, gt, s, ot, state, right), layout(s @ ot + term), atol=1e-5)
    assert torch.allclose(state["rec_norm"], term.norm(), rtol=1e-5)
    # a much larger next residual is limited to 1.01x the last norm, in the same direction
    limited = _recovered_update(g, gt, s, 10 * ot, state, right) - layout(s @ (10 * ot))
    assert torch.allclose(limited.norm(), 1.01 * term.norm(), rtol=1e-5)
    assert torch.allclose(limited / limited.norm(), layout(term / term.norm()), atol=1e-5)
    # a smaller one passes unchanged
    small = _recovered_update(g, gt, s, 0.5 * ot, state, right) - layout(s @ (0.5 * ot))
    assert torch.allclose(small, layout(0.5 * term), rtol=1e-4, atol=1e-5)


def test_recovery_norm_uses_the_gram_matrix_of_a_non_orthonormal_basis():
    gen = torch.Generator().manual_seed(1)
    s = orthonormal(12, 3, gen) * torch.tensor([1.0, 1.2, 0.8])  # columns not unit length
    g = torch.randn(12, 20, generator=gen)
    gt, ot = s.T @ g, torch.randn(3, 20, generator=gen)
    phi = ot.norm(dim=0) / (gt.norm(dim=0) + 1e-8)
    exact = ((g - s @ gt) * phi).norm()
    state = {}
    recovery_scales(g, gt, ot, state, {"recovery_limit": 1.01}, gram=s.T @ s)
    assert torch.allclose(state["rec_norm"], exact, rtol=1e-4)
    recovery_scales(g, gt, ot, wrong := {}, {"recovery_limit": 1.01})  # assuming S^T S = I is measurably off
    assert not torch.allclose(wrong["rec_norm"], exact, rtol=1e-2)


def test_presets_reject_unknown_names_and_inapplicable_options():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="subtrack\\+\\+"):
        create_optimizer("subtrak", model, target_modules="0")
    with pytest.raises(ValueError, match="tracker subtrack"):
        create_optimizer("galore", model, target_modules="0", rank=2, normalize=False)
    with pytest.raises(ValueError, match="rule sgd"):
        create_optimizer("galore", model, target_modules="0", rank=2, momentum=0.5)
    opt = create_optimizer("subtrack++", model, target_modules="0", rank=2, eta=0.5)
    group = opt.param_groups[0]
    assert (group["tracker"], group["moments"], group["recovery"], group["eta"]) == ("subtrack", "project", True, 0.5)
