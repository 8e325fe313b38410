"""gradspace's GaLore-AdamW must reproduce galore-torch's GaLoreAdamW, and its ``fira`` preset fira's FiraAdamW
(the reference packages), to float32 rounding across several subspace updates."""

import warnings

import pytest

from conftest import batches, make_model, projected_groups, train
from gradspace import SubspaceOptimizer, create_optimizer

galore_torch = pytest.importorskip("galore_torch")
fira = pytest.importorskip("fira")


def reference_run(data, proj_type="std", **kw):
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = galore_torch.GaLoreAdamW(projected_groups(model, proj_type=proj_type), lr=1e-2, weight_decay=0.05, **kw)
    return train(model, opt, data)


def relative_diff(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_matches_galore_torch_after_100_steps(proj_type):
    data = batches(100)
    ref = reference_run(data, proj_type)
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, proj_type=proj_type), lr=1e-2, weight_decay=0.05)
    train(model, opt, data)
    # 100 steps at gap 20: the basis was recomputed at steps 20, 40, 60, 80 after the initial SVD
    assert all(opt.state[p]["updates"] == 4 for p in (model.up.weight, model.mid.weight, model.down.weight))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert relative_diff(p, q) < 1e-5, name
    # and the run actually moved: GaLore is not a no-op
    assert relative_diff(model.up.weight, make_model().up.weight) > 1e-2


def test_create_optimizer_galore_matches_reference_on_the_three_shapes():
    data = batches(100)
    ref = reference_run(data)
    model = make_model()
    opt = create_optimizer(
        "galore", projected_groups(model), lr=1e-2, weight_decay=0.05, rank=6, update_proj_gap=20, scale=0.25
    )
    train(model, opt, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert relative_diff(p, q) < 1e-5


def fira_groups(model, proj_type):
    groups = projected_groups(model, rank=6, gap=12, proj_type=proj_type)
    groups[0]["alpha"] = groups[0].pop("scale")  # Fira's name for GaLore's scale
    return groups


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fira_preset_matches_fira_after_60_steps(proj_type):
    """Recovery scaling in the reference form, alpha S Ot + phi (G - alpha S Gt) with Fira's limiter.

    (Data seed 2: on seed 1 the two runs, 4e-7 apart at step 12, get opposite LAPACK signs for one singular
    vector of up.weight's gradient, a discontinuity of the SVD that galore-torch and Fira share; with moments
    kept, that flips one row of the first moment. Every other seed tried matches to 5e-7.)"""
    data = batches(60, seed=2)
    ref = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fira.FiraAdamW(fira_groups(ref, proj_type), lr=1e-2, weight_decay=0.05)
    train(ref, opt, data)
    model = make_model()
    groups = projected_groups(model, rank=6, gap=12, proj_type=proj_type)
    opt = create_optimizer("fira", groups, lr=1e-2, weight_decay=0.05)
    train(model, opt, data)
    assert all(opt.state[p]["updates"] == 4 for p in (model.up.weight, model.mid.weight, model.down.weight))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert relative_diff(p, q) < 1e-5, name
    # recovery matters here: GaLore on the same data ends measurably elsewhere, and so does the variant
    # that scales the whole update (residual included) by alpha, which gradspace used to do
    galore = make_model()
    train(
        galore,
        create_optimizer(
            "galore", projected_groups(galore, rank=6, gap=12, proj_type=proj_type), lr=1e-2, weight_decay=0.05
        ),
        data,
    )
    assert relative_diff(galore.mid.weight, ref.mid.weight) > 1e-3
    true = make_model()
    train(
        true,
        create_optimizer(
            "fira",
            projected_groups(true, rank=6, gap=12, proj_type=proj_type),
            lr=1e-2,
            weight_decay=0.05,
            recovery_residual="true",
        ),
        data,
    )
    assert relative_diff(true.mid.weight, ref.mid.weight) > 1e-4
