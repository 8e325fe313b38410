"""int8 weights (``gradspace.int8_weights``, ``--dtype int8``): the layout, the rounding, autograd, the optimizer's
write-back, checkpoints and exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradspace import create_optimizer
from gradspace.int8_weights import (
    Int8Weight,
    dequantize,
    int8_bytes,
    is_int8,
    quantize,
    quantize_model_,
)
from gradspace.layerwise import Layerwise
from gradspace.methods import METHODS
from gradspace.train.models import build_llama
from gradspace.train.precision import compute_dtype


def test_codes_and_scales_follow_the_symmetric_group_layout():
    torch.manual_seed(0)
    w = torch.randn(6, 512)
    codes, scales = quantize(w, 256)
    assert codes.dtype == torch.int8 and scales.shape == (6, 2)
    groups = w.view(6, 2, 256)
    torch.testing.assert_close(scales, groups.abs().amax(-1) / 120)
    assert (codes.view(6, 2, 256).abs().amax(-1) == 120).all()  # each group's largest at +-120: room to grow
    err = (dequantize(codes, scales, torch.float32) - w).view(6, 2, 256).abs().amax(-1)
    assert (err <= scales / 2 * (1 + 1e-5)).all()  # round-to-nearest: at most half a step
    _, per_row = quantize(torch.randn(4, 100), 256)  # 100 inputs: not a multiple of the group, one scale per row
    assert per_row.shape == (4, 1)
    codes, scales = quantize(torch.zeros(2, 256), 256)  # an all-zero group stays zero
    assert not codes.any() and torch.isfinite(scales).all()


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_drops_the_update():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    step = (w.abs().amax(1, keepdim=True) / 120).mean().item()
    inner = w.abs() < 0.5 * w.abs().amax(1, keepdim=True)  # moved; each group's largest is not, so scales stay
    update = 0.01 * step * inner  # a hundredth of one code's step: round-to-nearest keeps nothing of it
    rtn = Int8Weight.from_float(w, 256)
    before = rtn.dequantize().clone()
    with torch.no_grad(), rtn.updating(None):
        rtn.add_(update)
    assert torch.equal(rtn.dequantize(), before)  # lost entirely
    g, moved = torch.Generator().manual_seed(0), []
    for _ in range(50):  # the mean move of 8,000 elements, 50 times: its standard error is 1.6% of the update
        weight = Int8Weight.from_float(w, 256)
        with torch.no_grad(), weight.updating(g):
            weight.add_(update)
        moved.append((weight.dequantize() - before)[inner].mean().item())
        assert not (~inner & (weight.dequantize() != before)).any()  # an element no update moved keeps its code
    mean = sum(moved) / len(moved)
    assert abs(mean - 0.01 * step) < 0.1 * 0.01 * step, (mean, 0.01 * step)


def test_a_group_that_outgrows_its_scale_is_rescaled_with_room_to_grow():
    w = torch.linspace(-1, 1, 256).repeat(2, 1)
    weight = Int8Weight.from_float(w, 256)
    with torch.no_grad(), weight.updating(None):
        weight.mul_(1.5)  # 180 steps, past 127: a new scale, the largest value at 120 again
    assert (weight.codes.abs().amax(1) == 120).all()
    with torch.no_grad(), weight.updating(None):
        weight.mul_(1.05)  # 126 steps: the scale stays
    assert (weight.codes.abs().amax(1) == 126).all()
    torch.testing.assert_close(weight.dequantize(), 1.575 * w, atol=1.5 / 120, rtol=0)


def test_a_linear_layer_computes_and_differentiates_as_with_the_dequantised_weight():
    torch.manual_seed(0)
    layer = nn.Linear(512, 48)
    quantize_model_(nn.Sequential(layer), ["0"], group_size=128)
    assert is_int8(layer.weight) and isinstance(layer.weight, nn.Parameter)
    x = torch.randn(2, 5, 512, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.weight.dequantize().detach().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    F.linear(x2, w, b2).square().sum().backward()
    assert type(layer.weight.grad) is torch.Tensor and layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.bias.grad, b2.grad)


def test_nothing_of_the_weight_but_its_codes_is_kept_between_forward_and_backward():
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=300, int8_group_size=64)
    shapes = {tuple(p.shape) for p in model.parameters() if is_int8(p)}
    saved = []
    ids = torch.randint(0, 300, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert not shapes & set(saved) and not {s[::-1] for s in shapes} & set(saved)


def test_a_model_built_in_int8_never_exists_in_full_precision_and_initialises_as_the_float_one():
    torch.manual_seed(0)
    model = build_llama("mini", vocab_size=300, dtype=torch.bfloat16, int8_group_size=128)
    int8 = [p for p in model.parameters() if is_int8(p)]
    assert len(int8) == 4 * 7 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert int8_bytes(model) < sum(p.numel() for p in int8) * 1.05
    std = torch.cat([p.dequantize(torch.float32).flatten() for p in int8]).std().item()
    assert abs(std - 0.02) < 0.001  # the model's own initialisation (initializer_range), quantised
    float_model = build_llama("mini", vocab_size=300)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, float_model.model.rotary_emb.inv_freq)


def test_the_state_dict_holds_the_stored_form_and_loads_back_exactly():
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=300, int8_group_size=64)
    state = model.state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert state[key].dtype == torch.int8 and state[key + "_scales"].dtype == torch.float32
    assert all(type(v) is torch.Tensor for v in state.values())
    other = build_llama("tiny", vocab_size=300, int8_group_size=64)
    other.load_state_dict(state)
    assert torch.equal(other.get_submodule(key[:-7]).weight.codes, state[key])
    float_state = build_llama("tiny", vocab_size=300).state_dict()  # a float checkpoint: quantised on load
    other.load_state_dict(float_state)
    torch.testing.assert_close(other.get_submodule(key[:-7]).weight.dequantize(), float_state[key], atol=1e-3, rtol=0)


def _train(
    method: str, dtype: torch.dtype, layerwise: bool, steps: int = 4, int8: bool = True, **kw
) -> tuple[list[float], nn.Module]:
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=300, dtype=dtype, int8_group_size=64 if int8 else None)
    options = {} if METHODS[method] is None else {"rank": 4, "update_proj_gap": 2}
    opt = create_optimizer(method, model, lr=1e-2, **options, **kw)
    lw = Layerwise(opt) if layerwise else None
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if lw is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_int8_weights(method):
    losses, model = _train(method, torch.float32, layerwise=False)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(is_int8(p) for n, p in model.named_parameters() if n.endswith("proj.weight"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_bfloat16_weights_with_stochastic_rounding(method):
    losses, model = _train(method, torch.bfloat16, layerwise=False, int8=False, weight_rounding="stochastic")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("method", ["galore", "apollo-mini", "adamw"])
def test_int8_weights_train_layer_wise_in_bfloat16(method):
    losses, _ = _train(method, torch.bfloat16, layerwise=True)
    assert losses[-1] < losses[0], losses


def test_the_write_back_is_seeded_so_two_runs_agree_bit_for_bit():
    a, b = _train("galore", torch.float32, False)[1], _train("galore", torch.float32, False)[1]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_round_to_nearest_is_an_option_and_loses_small_updates():
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=300, int8_group_size=64)
    before = {n: p.codes.clone() for n, p in model.named_parameters() if is_int8(p)}
    opt = create_optimizer("galore", model, lr=1e-5, rank=4, weight_rounding="nearest")
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(before[n], p.codes) for n, p in model.named_parameters() if is_int8(p))
    stochastic = create_optimizer("galore", model, lr=1e-5, rank=4)  # the default for int8: stochastic
    model(input_ids=ids, labels=ids).loss.backward()
    stochastic.step()
    assert any(not torch.equal(before[n], p.codes) for n, p in model.named_parameters() if is_int8(p))


def test_a_cli_run_in_int8_resumes_bit_exact_and_exports_the_dequantised_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import run
    from gradspace.train.checkpoint import load_checkpoint
    from test_cli import SMALL

    args = ["pretrain", *SMALL, "--dtype", "int8", "--method", "galore", "--rank", 8, "--update-gap", 2]
    assert run(*args, "--save-every", 3, "--out", tmp_path / "a") == 0
    assert run("pretrain", "--resume", tmp_path / "a" / "checkpoints" / "ckpt-0000003.pt", "--out", tmp_path / "b") == 0
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "ckpt-0000006.pt")["model"] for r in "ab")
    assert a["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    up = exported.model.layers[0].mlp.up_proj.weight
    compute = compute_dtype({"dtype": "int8"})  # bfloat16 where the CPU is fast in it, else float32
    assert up.dtype == compute and not (set(exported.state_dict()) - set(a))  # no codes or scales left
    codes, scales = a["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight_scales"]
    assert torch.equal(up, dequantize(codes, scales, compute))
    assert run("sample", tmp_path / "a", "--prompt", "ROMEO:", "--max-new-tokens", 5) == 0


def test_the_plan_counts_int8_weights_as_the_model_stores_them():
    from gradspace.plan.memory import plan_memory

    model = build_llama("mini", vocab_size=300, dtype=compute_dtype({"dtype": "int8"}), int8_group_size=256)
    meta = build_llama("mini", vocab_size=300, device="meta")
    plan = plan_memory(meta, method="galore", dtype="int8", probe=False)
    stored = int8_bytes(model) + sum(p.numel() * p.element_size() for p in model.parameters() if not is_int8(p))
    assert plan.line("weights") == stored, plan.table()


@pytest.mark.parametrize("group", [None, 64])
def test_a_resumed_preset_is_built_from_the_checkpoints_tensors_themselves(group):
    torch.manual_seed(0)
    trained = build_llama("tiny", vocab_size=300, int8_group_size=group)
    state = trained.state_dict()
    model = build_llama("tiny", vocab_size=300, int8_group_size=group, state=state)
    for name, p in model.named_parameters():  # the same storage: the weights are held once
        stored = p.codes if is_int8(p) else p
        assert stored.data_ptr() == state[name].data_ptr(), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 300, (2, 8))
    torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits)
