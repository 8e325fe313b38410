"""Layer-wise mode gives the normal mode's result, frees gradients in backward, and supports accumulation."""

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups
from gradspace import SubspaceOptimizer
from gradspace.layerwise import Layerwise


def normal(method_kw, data, accum):
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, gap=4), lr=1e-2, weight_decay=0.01, **method_kw)
    for i, (x, y) in enumerate(data):
        (nn.functional.mse_loss(model(x), y) / accum).backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model, opt


def layerwise(method_kw, data, accum):
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model, gap=4), lr=1e-2, weight_decay=0.01, **method_kw)
    lw = Layerwise(opt, accumulation_steps=accum)
    held = []
    for _i, (x, y) in enumerate(data):
        (nn.functional.mse_loss(model(x), y) / accum).backward()
        held.append(sum(p.grad is not None for p in (model.up.weight, model.mid.weight, model.down.weight)))
    lw.remove()
    return model, opt, held


METHODS = {
    "galore": {},
    "subtrack": {"tracker": "subtrack"},
    "grassjump-recovery": {"tracker": "grassjump", "moments": "project", "recovery": True},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_layerwise_without_accumulation_is_bit_identical(method):
    data = batches(13)
    ref, _ = normal(METHODS[method], data, 1)
    got, _, held = layerwise(METHODS[method], data, 1)
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), ref.parameters()))
    assert held == [0] * len(data)  # every gradient was freed inside backward


@pytest.mark.parametrize("method", list(METHODS))
def test_layerwise_with_accumulation_matches_normal_mode(method):
    data = batches(24)
    ref, ref_opt = normal(METHODS[method], data, 3)
    got, opt, held = layerwise(METHODS[method], data, 3)
    for a, b in zip(got.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[got.up.weight]["step"] == ref_opt.state[ref.up.weight]["step"] == 8
    # micro-batches 3, 4 accumulate for step 1 (no subspace update due): svd accumulates S^T G only and holds no
    # full gradient of the projected weights; subtrack needs every full gradient; micro-batches 0, 1 (first step,
    # no basis yet) hold full gradients for all
    assert held[0] == held[1] == 3
    assert held[3] == held[4] == (0 if method == "galore" else 3)


def test_bad_accumulation_steps():
    model = make_model()
    opt = SubspaceOptimizer(projected_groups(model), lr=1e-2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        Layerwise(opt, accumulation_steps=0)


def test_sync_callable_sets_the_windows_and_lr_changes_reach_the_hooks():
    # uneven windows, as a loop that decides them itself (the Trainer's last window of an epoch is shorter);
    # load_state_dict replaces the group dicts, and an lr written into the new ones must reach the hooks
    data, windows = batches(12), [3, 2, 1, 4, 2]
    ref = make_model()
    ref_opt = SubspaceOptimizer(projected_groups(ref, gap=2), lr=1e-2, weight_decay=0.01)
    got = make_model()
    opt = SubspaceOptimizer(projected_groups(got, gap=2), lr=1e-2, weight_decay=0.01)
    opt_sd = opt.state_dict()
    last = [False]
    Layerwise(opt, accumulation_steps=7, sync=lambda: last[0])  # sync wins over the count
    opt.load_state_dict(opt_sd)
    i = 0
    for w, size in enumerate(windows):
        for k in range(size):
            x, y = data[i]
            i += 1
            (nn.functional.mse_loss(ref(x), y) / size).backward()
            last[0] = k == size - 1
            (nn.functional.mse_loss(got(x), y) / size).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        opt.step()  # nothing left to step: the hooks did it
        for o in (ref_opt, opt):
            for group in o.param_groups:
                group["lr"] = 1e-2 / (w + 2)
    for a, b in zip(got.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[got.up.weight]["step"] == len(windows)
    assert all(p.grad is None for p in got.parameters())
