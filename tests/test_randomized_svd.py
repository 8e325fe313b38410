"""svd="randomized": a seeded range finder in place of the exact SVD, for every tracker that takes SVDs."""

import pytest
import torch

from conftest import batches, make_model, projected_groups, run, train, with_spectrum
from gradspace import SubspaceOptimizer, create_optimizer
from gradspace.trackers import Context
from gradspace.trackers.base import orthonormality_error
from gradspace.trackers.svd import SVD_DEFAULTS, randomized_basis, top_singular_basis
from test_cli import SMALL
from test_cli_options import last_checkpoint

SVD_TRACKERS = ("svd", "subtrack", "online_pca", "grasswalk", "grassjump")


def energy(basis, g):
    return float((basis.mT @ g).square().sum() / g.square().sum())


def test_captures_the_exact_svds_energy_orthonormal_and_seeded():
    gen = torch.Generator().manual_seed(0)
    g = with_spectrum(torch.arange(1, 121).float() ** -1.0, 120, 300, gen)
    exact = top_singular_basis(g, 24, right=False)
    state = torch.get_rng_state()
    ctx = Context(3, False, 7)
    b = randomized_basis(g, 24, ctx, 0, SVD_DEFAULTS["svd_oversample"], 1)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG
    assert orthonormality_error(b) < 1e-5
    assert energy(b, g) >= 0.998 * energy(exact, g)
    assert torch.equal(b, randomized_basis(g, 24, ctx, 0, 16, 1))  # same seed, index, draw: same basis
    other = randomized_basis(g, 24, Context(3, False, 7), 1, 16, 1)
    assert not torch.equal(b, other) and energy(other, g) >= 0.998 * energy(exact, g)
    # no power iteration and no oversampling is visibly worse on a slowly decaying spectrum
    assert energy(randomized_basis(g, 24, ctx, 0, 0, 0), g) < 0.99 * energy(exact, g)


@pytest.mark.parametrize("tracker", SVD_TRACKERS)
def test_every_svd_tracker_takes_it_and_resumes_exactly(tracker):
    data = batches(14)
    groups = lambda m: projected_groups(m, rank=4, gap=5, svd="randomized")  # noqa: E731
    a = make_model()
    opt = SubspaceOptimizer(groups(a), lr=1e-2, tracker=tracker, seed=1)
    train(a, opt, data)
    b = make_model()
    opt_b = SubspaceOptimizer(groups(b), lr=1e-2, tracker=tracker, seed=1)
    train(b, opt_b, data[:7])
    saved = opt_b.state_dict()
    opt_b = SubspaceOptimizer(groups(b), lr=1e-2, tracker=tracker, seed=1)
    opt_b.load_state_dict(saved)
    train(b, opt_b, data[7:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    exact = make_model()
    train(exact, SubspaceOptimizer(projected_groups(exact, rank=4, gap=5), lr=1e-2, tracker=tracker, seed=1), data)
    assert not torch.equal(exact.up.weight, a.up.weight)  # the option did something


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"svd": "fast"}, "svd must be 'exact' or 'randomized'"),
        ({"svd": "randomized", "svd_power_iters": -1}, "svd_power_iters"),
        ({"svd": "randomized", "svd_oversample": 1.5}, "svd_oversample"),
        ({"svd": "randomized", "tracker": "gaussian"}, "does not apply"),
        ({"svd": "randomized", "tracker": "adarank", "moments": "rotate"}, "does not apply"),
    ],
)
def test_bad_settings_are_errors(options, words):
    with pytest.raises(ValueError, match=words):
        SubspaceOptimizer(projected_groups(make_model(), rank=4), **options)


def test_the_cli_flag_reaches_the_optimizer(tmp_path):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--method", "galore", "--svd", "randomized", "--out", out) == 0
    group = next(g for g in last_checkpoint(out)["optimizer"]["param_groups"] if "rank" in g)
    assert group["svd"] == "randomized"
    assert run("pretrain", *SMALL, "--method", "apollo", "--svd", "randomized", "--out", tmp_path / "b") == 2
    opt = create_optimizer("fira", make_model(), target_modules=["up"], rank=4, svd="randomized")
    assert next(g for g in opt.param_groups if "rank" in g)["svd"] == "randomized"


def test_power_iterations_default_to_one_for_a_thin_sketch_and_none_for_a_wide_one():
    from gradspace.trackers.svd import power_iterations

    assert power_iterations({}, 2048, 128) == 1  # 144 columns of 2048
    assert power_iterations({}, 2048, 512) == 0  # 528 columns: more than a quarter
    assert power_iterations({"svd_power_iters": 3}, 2048, 512) == 3
