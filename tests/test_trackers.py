"""Contracts every tracker meets through the optimizer: tracking a rotating subspace in both orientations, named
hyperparameter errors, bit-identical resume, seeded determinism without the global RNG."""

import io

import pytest
import torch
from torch import nn

from conftest import angle, batches, make_model, projected_groups, rotating_stream, train
from gradspace import SubspaceOptimizer

# ------------------------------------------------------------------------------------------------- tracking
TRACKING = {
    # 20 subspace updates (steps 5, 10, ..., 100) vs 200 online-PCA steps, both for a total rotation of 1 rad
    "subtrack": {"steps": 101, "omega": 0.01, "gap": 5},
    "online_pca": {"steps": 201, "omega": 0.005, "gap": 200},
}


def track(tracker, shape, **options):
    """Feed the stream to one (m, n) weight through SubspaceOptimizer; the basis side is min(m, n) = 30 either
    way: the rows for (30, 60) (G itself), the columns for (60, 30) (the weight's gradient is G^T)."""
    cfg = TRACKING[tracker]
    p = nn.Parameter(torch.zeros(shape))
    group = {"params": [p], "rank": 4, "update_proj_gap": cfg["gap"]}
    opt = SubspaceOptimizer([group], lr=1e-3, tracker=tracker, **options)
    stream = list(rotating_stream(cfg["steps"], cfg["omega"]))
    for g, _ in stream:
        p.grad = g if shape[0] < shape[1] else g.mT.contiguous()
        opt.step()
    (_, start), (_, truth) = stream[0], stream[-1]
    return angle(opt.state[p]["basis"], truth), angle(start, truth)


@pytest.mark.parametrize("shape", [(30, 60), (60, 30)])
@pytest.mark.parametrize(
    "tracker, options",
    [
        ("subtrack", {}),
        ("subtrack", {"accumulate": False}),
        ("online_pca", {}),
        ("online_pca", {"p_optimizer": "sgd", "alpha": 100.0}),  # SGD needs a far larger step than Adam
    ],
)
def test_tracks_a_rotating_subspace_in_both_orientations(tracker, options, shape):
    tracked, frozen = track(tracker, shape, **options)
    assert frozen == pytest.approx(1.0, abs=1e-3)  # the truth really moved by 1 rad
    assert tracked <= 0.5 * frozen, (tracked, frozen)


def test_orientations_give_the_same_basis():
    """The optimizer transposes for m > n: the tracker must see exactly the same oriented gradients."""
    bases = []
    for shape in [(30, 60), (60, 30)]:
        p = nn.Parameter(torch.zeros(shape))
        opt = SubspaceOptimizer([{"params": [p], "rank": 4, "update_proj_gap": 5}], tracker="subtrack")
        for g, _ in rotating_stream(31, 0.01):
            p.grad = g if shape[0] < shape[1] else g.mT.contiguous()
            opt.step()
        bases.append(opt.state[p]["basis"])
    assert opt.state[p]["updates"] == 6
    assert angle(bases[0], bases[1]) < 1e-3


@pytest.mark.parametrize(
    "tracker, bad",
    [
        ("subtrack", {"eta": -1.0}),
        ("subtrack", {"eta": float("nan")}),
        ("subtrack", {"accumulate": 1}),
        ("subtrack", {"normalize": "yes"}),
        ("online_pca", {"alpha": 0.0}),
        ("online_pca", {"osd_lambda": -0.1}),
        ("online_pca", {"p_optimizer": "rmsprop"}),
        ("online_pca", {"p_lr_mode": "paper"}),
        ("online_pca", {"p_lr": 0.0}),
        ("online_pca", {"p_weight_decay": -1.0}),
    ],
)
def test_bad_hyperparameters_are_named(tracker, bad):
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        SubspaceOptimizer([{"params": [nn.Parameter(torch.zeros(8, 8))], "rank": 2}], tracker=tracker, **bad)


# --------------------------------------------------------------------------------------------------- resume
def run(tracker, data, options, resume_at=None):
    def optimizer(model):
        return SubspaceOptimizer(projected_groups(model, gap=5), lr=1e-2, weight_decay=0.01, tracker=tracker, **options)

    model = make_model()
    opt = optimizer(model)
    if resume_at is None:
        return train(model, opt, data)
    train(model, opt, data[:resume_at])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model = make_model(seed=1)  # fresh, different weights: everything must come from the checkpoint
    opt = optimizer(model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    return train(model, opt, data[resume_at:])


@pytest.mark.parametrize(
    "tracker, options",
    [
        ("subtrack", {}),
        ("subtrack", {"accumulate": False}),
        ("online_pca", {}),
        ("online_pca", {"p_lr_mode": "code", "p_weight_decay": 0.01, "osd_lambda": 0.0, "p_optimizer": "sgd"}),
    ],
)
@pytest.mark.parametrize("resume_at", [10, 12])  # step 10 is a subspace update (gap 5); 12 lies between two
def test_resume_is_bit_identical(tracker, options, resume_at):
    data = batches(18)
    ref = run(tracker, data, options)
    resumed = run(tracker, data, options, resume_at)
    for (name, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------- through the optimizer: determinism
METHODS = {
    "adarank": {"tracker": "adarank", "moments": "rotate", "eta_th": 0.2, "min_gap": 2},
    "grasswalk": {"tracker": "grasswalk", "moments": "project", "recovery": True, "eta": 0.5},
    "grassjump": {"tracker": "grassjump", "moments": "project", "recovery": True},
}


def make_opt(model, method, seed=0):
    return SubspaceOptimizer(
        projected_groups(model, rank=6, gap=5), lr=1e-2, weight_decay=0.01, seed=seed, **METHODS[method]
    )


def bases(opt):
    return [st["basis"].clone() for st in opt.state.values() if "basis" in st]


@pytest.mark.parametrize("method", list(METHODS))
def test_same_seed_same_bases_and_no_global_rng(method):
    data = batches(12)
    runs = []
    for seed in (0, 0, 1):
        model = make_model()
        opt = make_opt(model, method, seed)
        train(model, opt, data[:-1])
        model.zero_grad()
        nn.functional.mse_loss(model(data[-1][0]), data[-1][1]).backward()
        rng = torch.random.get_rng_state()
        opt.step()
        assert torch.equal(rng, torch.random.get_rng_state())
        runs.append(bases(opt))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


# ------------------------------------------------------------------------------ through the optimizer: resume
@pytest.mark.parametrize("method", list(METHODS))
def test_random_and_adaptive_trackers_resume_bit_identically(method):
    data = batches(40)
    model = make_model()
    opt = make_opt(model, method)
    ranks = []
    for x, y in data[:20]:
        train(model, opt, [(x, y)])
        ranks.append([b.shape[1] for b in bases(opt)])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[20:])
    if method == "adarank":  # the checkpoint holds state whose shapes changed during the run
        assert ranks[-1] != ranks[0], ranks

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_model(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make_opt(resumed, method, seed=7)  # the seed comes back from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[20:])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert all(st["updates"] >= 3 for st in opt2.state.values() if "basis" in st)
