"""basis_dtype: the basis kept in bfloat16 or int8 (per-column scales) between steps, unpacked to float32 for use."""

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups, train
from gradspace import SubspaceOptimizer, create_optimizer
from gradspace.basis_storage import load, store
from gradspace.bench.memory import formula_bytes
from gradspace.optimizer import optimizer_state_bytes


def run(basis_dtype, steps=12, tracker="svd", **kw):
    model = make_model()
    opt = SubspaceOptimizer(
        projected_groups(model, rank=4, gap=5, basis_dtype=basis_dtype), lr=1e-2, tracker=tracker, **kw
    )
    train(model, opt, batches(steps))
    return model, opt


@pytest.mark.parametrize(("kind", "dtype"), [("bfloat16", torch.bfloat16), ("int8", torch.int8)])
def test_stored_smaller_and_trains_like_float32(kind, dtype):
    ref, ref_opt = run("float32")
    model, opt = run(kind)
    st = opt.state[model.up.weight]
    assert st["basis"].dtype == dtype and ("basis_scale" in st) == (kind == "int8")
    for i, name in enumerate(("up", "mid", "down")):
        a, b = getattr(model, name).weight, getattr(ref, name).weight
        assert float((a - b).norm() / b.norm()) < 2e-2, name  # rounding of the basis only
        energy, energy_ref = (o.diagnostics()["weights"][f"param{i}"]["energy"] for o in (opt, ref_opt))
        assert abs(energy - energy_ref) < 0.01, name
    assert optimizer_state_bytes(opt) < optimizer_state_bytes(ref_opt)


def test_an_unchanged_basis_is_not_requantised_and_a_resume_is_exact():
    model, opt = run("int8", steps=6)
    st = opt.state[model.up.weight]
    codes, scale = st["basis"], st["basis_scale"]
    train(model, opt, batches(2, seed=5))  # steps 6, 7: no update due (gap 5 -> next at 10)
    assert st["basis"] is codes and st["basis_scale"] is scale
    data = batches(14)
    a = make_model()
    opt_a = SubspaceOptimizer(projected_groups(a, rank=4, gap=5, basis_dtype="int8"), lr=1e-2)
    train(a, opt_a, data)
    b = make_model()
    opt_b = SubspaceOptimizer(projected_groups(b, rank=4, gap=5, basis_dtype="int8"), lr=1e-2)
    train(b, opt_b, data[:7])
    saved = opt_b.state_dict()
    opt_b = SubspaceOptimizer(projected_groups(b, rank=4, gap=5, basis_dtype="int8"), lr=1e-2)
    opt_b.load_state_dict(saved)
    train(b, opt_b, data[7:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="basis_dtype"):  # another storage format is refused, not misread
        SubspaceOptimizer(projected_groups(make_model(), rank=4, gap=5), lr=1e-2).load_state_dict(saved)


def test_int8_packing_round_trip():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(300, 6)).Q
    state = {}
    store(state, basis, {"basis_dtype": "int8"})
    assert state["basis"].dtype == torch.int8 and state["basis_scale"].shape == (6,)
    err = (load(state) - basis).abs().max(dim=0).values
    assert bool((err <= basis.abs().amax(dim=0) / 254 + 1e-7).all())  # half a quantisation step per column
    store(state, basis, {"basis_dtype": "bfloat16"})
    assert state["basis"].dtype == torch.bfloat16 and "basis_scale" not in state
    assert float((load(state) - basis).abs().max() / basis.abs().max()) <= 2.0**-8
    store(state, torch.zeros(300, 6), {"basis_dtype": "int8"})
    assert torch.equal(load(state), torch.zeros(300, 6))


def test_memory_formula_and_errors():
    model = nn.ModuleDict({"attn": nn.Linear(64, 256), "mlp": nn.Linear(256, 64)})
    for kind, basis in (("float32", 4 * 64 * 8), ("bfloat16", 2 * 64 * 8), ("int8", 64 * 8 + 4 * 8)):
        opt = create_optimizer("galore", model, rank=8, basis_dtype=kind)
        model["mlp"](model["attn"](torch.randn(2, 64))).sum().backward()
        opt.step()
        assert optimizer_state_bytes(opt) == formula_bytes(model, "galore", 8, {"basis_dtype": kind})
        assert (
            opt.state[model["attn"].weight]["basis"].numel() * opt.state[model["attn"].weight]["basis"].element_size()
            + (32 if kind == "int8" else 0)
            == basis
        )
        model.zero_grad()
    with pytest.raises(ValueError, match="trains its basis"):
        create_optimizer("osd", model, rank=8, basis_dtype="bfloat16")
    with pytest.raises(ValueError, match="basis_dtype must be one of"):
        create_optimizer("galore", model, rank=8, basis_dtype="float16")
