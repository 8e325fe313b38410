"""Inner rules: each against its reference or formula, the moment seam, and each as the base of SubspaceOptimizer."""

import importlib.util
import io
import math
from copy import deepcopy

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups
from gradspace import SubspaceOptimizer, optimizer_state_bytes
from gradspace.components import flat_items
from gradspace.rules import RULES, get_rule
from gradspace.rules.adam8bit import BLOCK, dequantize, dynamic_map, quantize

#: every rule, with the options and an lr that trains the conftest model
CONFIGS = {
    "adamw": ({}, 1e-2),
    "adamw8bit": ({}, 1e-2),
    "lion": ({}, 1e-3),
    "sgd": ({"momentum": 0.9}, 2e-2),
    "sgd_plain": ({"momentum": 0.0}, 5e-2),
    "adafactor": ({}, 1e-2),
    "adafactor_beta1": ({"beta1": 0.9}, 1e-2),
}


def rule_of(config):
    return config.split("_")[0]


def scaled_batches(n, seed=1, batch=16):
    """conftest's regression with targets scaled to unit size, so that 24 steps visibly train the model."""
    return [(x, y / 5) for x, y in batches(n, seed=seed, batch=batch)]


EVAL_BATCH = scaled_batches(1, batch=256)[0]  # the same teacher as the training data


def eval_loss(model):
    x, y = EVAL_BATCH
    with torch.no_grad():
        return nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y).item()


def losses_of(model, opt, data):
    out = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def groups_with(groups, options):
    """Rule options go in every group: SubspaceOptimizer(..., **options) is overridden by the rule's defaults
    (a core bug, reported)."""
    return [{**g, **options} for g in groups]


def make_opt(config, model, policy="keep", gap=4):
    options, lr = CONFIGS[config]
    groups = groups_with(projected_groups(model, rank=4, gap=gap), options)
    return SubspaceOptimizer(groups, lr=lr, base=rule_of(config), moments=policy)


def run_rule(rule, grads, group, like=None):
    """Drive a rule directly over a list of gradients; returns the state and the last (direction, factor)."""
    state = {}
    rule.init_state(state, grads[0] if like is None else like, group)
    out = None
    for g in grads:
        out = rule.update(g, state, group)
    return state, out


def group_for(config):
    options, _ = CONFIGS[config]
    rule = get_rule(rule_of(config))
    return rule, {**rule.defaults, **options}


# ---------------------------------------------------------------- references
@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.5, "dampening": 0.3},
        {"momentum": 0.0},
    ],
)
def test_sgd_is_bit_identical_to_torch_sgd(options):
    data = batches(20)
    ref, model = make_model(), make_model()
    losses_of(ref, torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **options), data)
    opt = SubspaceOptimizer([{"params": model.parameters(), **options}], lr=0.05, base="sgd")
    losses_of(model, opt, data)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    if options["momentum"] == 0:
        assert all(set(st) == {"step", "rule"} and st["rule"] == {} for st in opt.state.values())


def test_lion_matches_the_formula():
    data = batches(20)
    model, ref = make_model(), make_model()
    losses_of(model, SubspaceOptimizer(model.parameters(), lr=1e-3, base="lion", betas=(0.9, 0.99)), data)
    ms = [torch.zeros_like(p) for p in ref.parameters()]
    for x, y in data:
        ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p, m in zip(ref.parameters(), ms):
                c = 0.9 * m + 0.1 * p.grad
                p -= 1e-3 * torch.sign(c)
                m.copy_(0.99 * m + 0.01 * p.grad)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_adafactor_matches_torch_adafactor_given_its_step_size():
    """torch steps by max(eps2, RMS(W)) * min(lr, 1/sqrt(t)); our rule steps by lr, so we feed it that lr (one group
    per parameter). Covers 1-D (unfactored), 2-D and 3-D (last two dims factored) tensors."""
    torch.manual_seed(0)
    shapes = [(7,), (6, 9), (3, 4, 5), (10, 3)]
    targets = [torch.randn(s) for s in shapes]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    lr, eps2 = 0.05, 1e-3
    ref = torch.optim.Adafactor(theirs, lr=lr, weight_decay=0.0, foreach=False)
    opt = SubspaceOptimizer([{"params": [p]} for p in ours], lr=lr, base="adafactor")

    def loss(params):
        return sum(((p - t) ** 2 * (1 + t.abs())).sum() + p.sin().sum() for p, t in zip(params, targets))

    for t in range(1, 21):
        for params, o in ((theirs, ref), (ours, opt)):
            o.zero_grad()
            loss(params).backward()
        for group, p in zip(opt.param_groups, ours):
            rms = float(p.detach().norm() / math.sqrt(p.numel()))
            group["lr"] = max(eps2, rms) * min(lr, 1 / math.sqrt(t))
        ref.step()
        opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(ours, theirs):  # the same second moment, factored the same way
        st, rst = opt.state[p], ref.state[q]
        if p.dim() >= 2:
            torch.testing.assert_close(st["rule"]["fac_row"], rst["row_var"])
            torch.testing.assert_close(st["rule"]["fac_col"], rst["col_var"])
        else:
            torch.testing.assert_close(st["rule"]["fac_v"], rst["variance"])


def test_adafactor_beta1_is_an_ema_of_the_clipped_update():
    rule = get_rule("adafactor")
    torch.manual_seed(0)
    grads = [torch.randn(5, 8) * (i + 1) for i in range(4)]
    plain = {**rule.defaults}
    with_m = {**rule.defaults, "beta1": 0.8}
    s_plain, s_m = {}, {}
    rule.init_state(s_plain, grads[0], plain)
    rule.init_state(s_m, grads[0], with_m)
    m = torch.zeros(5, 8)
    for g in grads:
        u, f = rule.update(g, s_plain, plain)
        d, f_m = rule.update(g, s_m, with_m)
        m = 0.8 * m + 0.2 * u * f
        assert f_m == 1.0
        torch.testing.assert_close(d, m)


def test_8bit_codes_are_bitsandbytes_maps_rounded_to_nearest():
    for signed in (True, False):
        code = dynamic_map(signed)
        assert code.shape == (256,) and bool((code[1:] > code[:-1]).all()) and code.max() == 1.0
        if importlib.util.find_spec("bitsandbytes") is not None:
            from bitsandbytes.functional import create_dynamic_map

            assert torch.equal(code, create_dynamic_map(signed=signed))
        torch.manual_seed(1)
        x = torch.randn(3, 300) * torch.logspace(-4, 0, 300)  # 900 elements: 4 blocks, the last one partial
        x = x if signed else x.square()
        idx, absmax = quantize(x, signed)
        assert idx.dtype == torch.uint8 and idx.shape == x.shape and absmax.shape == (math.ceil(900 / BLOCK),)
        blocks = torch.nn.functional.pad(x.reshape(-1), (0, 4 * BLOCK - 900)).view(4, BLOCK)
        assert torch.equal(absmax, blocks.abs().amax(1))
        normed = (blocks / absmax[:, None]).reshape(-1)[:900]
        nearest = (normed[:, None] - code[None, :]).abs().min(dim=1).values
        chosen = (normed - code[idx.reshape(-1).long()]).abs()
        assert torch.allclose(chosen, nearest, atol=1e-7)
        back = dequantize(idx, absmax, signed)
        assert back.shape == x.shape and back.dtype == torch.float32
        assert float((back - x).norm() / x.norm()) < 0.02


def test_8bit_state_is_two_bytes_per_element_plus_block_scales():
    w = nn.Parameter(torch.randn(300, 1000))
    opt = SubspaceOptimizer([w], base="adamw8bit")
    w.grad = torch.randn_like(w)
    opt.step()
    n = w.numel()
    per_element = optimizer_state_bytes(opt) / n
    expected = 2 + 2 * 4 * math.ceil(n / BLOCK) / n  # m and v codes, one float32 absmax per block for each
    assert per_element == pytest.approx(expected) and per_element < 2.04
    print(f"adamw8bit state: {per_element:.4f} bytes/element (float32 AdamW: 8)")


def test_8bit_trajectory_stays_close_to_float32_adamw():
    def run(base, steps=150):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        start = [p.detach().clone() for p in model.parameters()]
        g = torch.Generator().manual_seed(1)
        w1, w2 = torch.randn(16, 8, generator=g) / 4, torch.randn(8, 1, generator=g)
        opt = SubspaceOptimizer(model.parameters(), lr=2e-3, base=base)
        losses = []
        for _ in range(steps):
            x = torch.randn(64, 16, generator=g)
            loss = nn.functional.mse_loss(model(x), torch.tanh(x @ w1) @ w2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        return sum(losses[-20:]) / 20, losses[0], flat, torch.cat([p.flatten() for p in start])

    loss32, first, p32, p0 = run("adamw")
    loss8, _, p8, _ = run("adamw8bit")
    rel_loss = abs(loss8 - loss32) / loss32
    rel_param = float((p8 - p32).norm() / p32.norm())
    rel_to_move = float((p8 - p32).norm() / (p32 - p0).norm())
    print(
        f"8-bit vs float32 AdamW: final loss {loss8:.4f} vs {loss32:.4f} ({rel_loss:.1%}), params differ by "
        f"{rel_param:.2%} of their norm, {rel_to_move:.1%} of the distance travelled"
    )
    assert loss32 < 0.2 * first
    assert rel_loss < 0.05 and rel_param < 0.05 and rel_to_move < 0.15


# ---------------------------------------------------------------- the moment seam
MOMENT_CONFIGS = ["adamw", "adamw8bit", "lion", "sgd", "adafactor_beta1"]


@pytest.mark.parametrize("config", MOMENT_CONFIGS)
def test_moments_round_trip(config):
    rule, group = group_for(config)
    torch.manual_seed(0)
    state, _ = run_rule(rule, [torch.randn(6, 40) for _ in range(3)], group)
    mom = rule.moments(state)
    assert set(mom) == ({"m", "v"} if rule.has_second_moment else {"m"})
    assert all(t.dtype == torch.float32 and t.shape == (6, 40) for t in mom.values())
    rule.set_moments(state, {k: v.clone() for k, v in mom.items()})
    again = rule.moments(state)
    tol = {"rtol": 2e-2, "atol": 1e-6} if config == "adamw8bit" else {"rtol": 1e-5, "atol": 1e-7}
    for k in mom:
        torch.testing.assert_close(again[k], mom[k], **tol)


def test_rules_without_moments_expose_none():
    for config, opts in (("sgd", {"momentum": 0.0}), ("adafactor", {})):
        rule = get_rule(config)
        group = {**rule.defaults, **opts}
        state, _ = run_rule(rule, [torch.randn(4, 7)], group)
        assert rule.moments(state) == {}


@pytest.mark.parametrize("config", MOMENT_CONFIGS)
@pytest.mark.parametrize("rows", [3, 9])
def test_set_moments_with_another_row_count(config, rows):
    """Adaptive rank changes r: moments come back (rows x l) and the next update must run at that shape."""
    rule, group = group_for(config)
    torch.manual_seed(0)
    state, _ = run_rule(rule, [torch.randn(6, 40) for _ in range(3)], group)
    c = torch.linalg.qr(torch.randn(max(rows, 6), max(rows, 6)))[0][:rows, :6]  # rows x 6 change of basis
    rule.set_moments(state, {k: (c * c if k == "v" else c) @ t for k, t in rule.moments(state).items()})
    assert all(t.shape == (rows, 40) for t in rule.moments(state).values())
    direction, factor = rule.update(torch.randn(rows, 40), state, group)
    assert direction.shape == (rows, 40) and bool(direction.isfinite().all()) and math.isfinite(factor)
    assert all(t.shape == (rows, 40) for t in rule.moments(state).values())


def test_adafactor_refactoring_is_exact_for_rank_one_v():
    rule, group = group_for("adafactor_beta1")
    state, _ = run_rule(rule, [torch.randn(5, 7)], group)
    v = (torch.rand(5, 1) + 0.1) @ (torch.rand(1, 7) + 0.1)
    rule.set_moments(state, {"m": torch.zeros(5, 7), "v": v})
    torch.testing.assert_close(rule.moments(state)["v"], v)


@pytest.mark.parametrize("name", sorted(RULES))
def test_reset_zeroes_and_restarts(name):
    rule = get_rule(name)
    group = {**rule.defaults, **({"beta1": 0.9} if name == "adafactor" else {})}
    state, _ = run_rule(rule, [torch.randn(4, 6) for _ in range(2)], group)
    fresh = {}
    rule.init_state(fresh, torch.empty(3, 6), group)
    state["stale"] = torch.ones(1)  # anything left in the rule's part: reset clears it all (the rule owns it)
    rule.reset(state, torch.empty(3, 6), group)
    assert set(state) == set(fresh) <= set(rule.state_keys)
    for key, value in state.items():
        if key in rule.state_keys and isinstance(value, torch.Tensor) and value.is_floating_point():
            assert not bool(value.any())
        elif key in rule.state_keys and not isinstance(value, torch.Tensor):
            assert value == 0
    assert all(t.shape == (3, 6) for t in rule.moments(state).values())


@pytest.mark.parametrize(
    "name, bad",
    [
        ("lion", {"betas": (0.9, 1.0)}),
        ("sgd", {"momentum": -1.0}),
        ("sgd", {"nesterov": True, "momentum": 0.0}),
        ("adafactor", {"beta2_decay": 0.5}),
        ("adafactor", {"clip_threshold": 0.5}),
        ("adafactor", {"beta1": 1.5}),
        ("adafactor", {"eps1": -1.0}),
        ("adamw8bit", {"eps": -1.0}),
    ],
)
def test_validate_names_the_bad_value(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SubspaceOptimizer([{"params": make_model().parameters(), **bad}], base=name)


def test_state_dtype_follows_param_unless_group_sets_it():
    for name in ("lion", "sgd", "adafactor"):
        rule = get_rule(name)
        for group_dtype, expected in ((None, torch.bfloat16), ("float32", torch.float32)):
            state = {}
            rule.init_state(
                state, torch.empty(4, 5, dtype=torch.bfloat16), {**rule.defaults, "state_dtype": group_dtype}
            )
            dtypes = {v.dtype for k, v in state.items() if isinstance(v, torch.Tensor)}
            assert dtypes == {expected}, name


# ---------------------------------------------------------------- as the base of SubspaceOptimizer
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("policy", ["keep", "reset", "rotate", "project"])
def test_every_rule_trains_under_every_policy(config, policy):
    model = make_model()
    opt = make_opt(config, model, policy)
    before = eval_loss(model)
    losses = losses_of(model, opt, scaled_batches(24))
    assert all(math.isfinite(x) for x in losses) and all(bool(p.isfinite().all()) for p in model.parameters())
    assert eval_loss(model) < 0.8 * before
    assert opt.state[model.up.weight]["updates"] == 5  # the basis moved at steps 4, 8, ..., 20
    assert opt.state[model.up.weight]["basis"].shape == (24, 4)  # projected
    assert "basis" not in opt.state[model.head.weight]  # full rank
    for st in opt.state.values():
        for key, value in flat_items(st):
            assert isinstance(value, (torch.Tensor, int, float)), (key, type(value))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_bf16_params_keep_their_state_dtype(config):
    model = make_model(dtype=torch.bfloat16)
    opt = make_opt(config, model, "rotate")
    before = eval_loss(model)
    losses = losses_of(model, opt, scaled_batches(12))
    assert all(math.isfinite(x) for x in losses) and eval_loss(model) < 0.9 * before
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for st in opt.state.values():
        floats = {
            v.dtype
            for k, v in st["rule"].items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not k.startswith("q8_")
        }
        assert floats <= {torch.bfloat16}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_from_weights_only_checkpoint_is_bit_identical(config):
    data = batches(14)
    model = make_model()
    opt = make_opt(config, model, "rotate")
    losses_of(model, opt, data)

    first = make_model()
    opt1 = make_opt(config, first, "rotate")
    losses_of(first, opt1, data[:7])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_model(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make_opt(config, resumed, "rotate")
    opt2.load_state_dict(ckpt["opt"])
    losses_of(resumed, opt2, data[7:])
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("correct_bias", [True, False])
def test_fused_full_rank_adamw_equals_the_per_weight_loop(correct_bias):
    from gradspace.rules.base import InnerRule

    rule = get_rule("adamw")
    group = {"betas": (0.9, 0.99), "eps": 1e-6, "correct_bias": correct_bias, "lr": 1e-2}
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 24), (24,), (3, 5)]
    fused = [torch.randn(s, generator=gen) for s in shapes]
    loop = [p.clone() for p in fused]
    states = [[{} for _ in shapes] for _ in range(2)]
    for ps, sts in zip((fused, loop), states):
        for p, st in zip(ps, sts):
            rule.init_state(st, p, group)
    states[0][2]["exp_step"] = 3  # a weight at another step count is bucketed apart
    states[1][2]["exp_step"] = 3
    for _ in range(5):
        for p, q in zip(fused, loop):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-4  # small: eps's placement shows
            q.grad = p.grad.clone()
        rule.step_full_rank(fused, states[0], group)
        InnerRule.step_full_rank(rule, loop, states[1], group)
    for p, q, a, b in zip(fused, loop, *states):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"]) and a["exp_step"] == b["exp_step"]


def test_adam8bit_steps_a_big_tensor_in_chunks_bit_for_bit(monkeypatch):
    """A full-rank tensor above CHUNK elements is stepped chunk by chunk (bounded temporaries) with exactly the
    one-piece result: blocks of 256 never straddle a chunk."""
    from gradspace import SubspaceOptimizer
    from gradspace.rules import adam8bit

    torch.manual_seed(0)
    start = torch.randn(40, 333)  # 13,320 elements: not a multiple of 256, so the last block is partial
    grads = [torch.randn(40, 333) for _ in range(3)]
    out = []
    for chunk in (1 << 22, 1024):
        monkeypatch.setattr(adam8bit, "CHUNK", chunk)
        w = torch.nn.Parameter(start.clone())
        opt = SubspaceOptimizer([w], lr=1e-2, base="adamw8bit", weight_decay=0.1)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        out.append((w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v)}))
    assert torch.equal(out[0][0], out[1][0])
    for key in out[0][1]:
        assert torch.equal(out[0][1][key], out[1][1][key]), key
    assert not torch.equal(out[0][0], start)


def test_adam8bit_zero_state_is_what_quantising_zeros_gives():
    from gradspace.rules import get_rule
    from gradspace.rules.adam8bit import quantize

    rule = get_rule("adamw8bit")
    for shape in ((3, 700), (256,), (1, 1)):
        state = {}
        rule.init_state(state, torch.empty(shape), {})
        for key, signed in (("m", True), ("v", False)):
            codes, absmax = quantize(torch.zeros(shape), signed=signed)
            assert torch.equal(state[f"q8_{key}"], codes) and torch.equal(state[f"q8_{key}_absmax"], absmax)
            assert state[f"q8_{key}"].is_contiguous()


def _8bit_state(shape, group, seed):
    """An adamw8bit state after a few torch-code steps of gradients spanning six orders of magnitude."""
    rule = get_rule("adamw8bit")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    rule.init_state(state, torch.zeros(shape), group)
    for t in range(3):
        rule.update(torch.randn(shape, generator=gen) * torch.logspace(-6, 0, shape[-1]) * 2.0**-t, state, group)
    return state


@pytest.mark.parametrize("shape", [(64, 256), (7, 300)])  # whole blocks; a partial last block
def test_8bit_bitsandbytes_kernel_steps_as_the_torch_code(shape):
    """bitsandbytes' fused kernel (the CUDA fast path; its CPU kernel here) against this rule's torch code from
    the same codes and gradient: the same weight update to float32 rounding and the same block scales. The codes
    differ where bitsandbytes' search misses the nearest code, which it does for small values of a block (on
    these gradients, spanning five orders of magnitude in each block, 18% of m's codes and 64% of v's), never by
    more than the table's coarsest step."""
    pytest.importorskip("bitsandbytes")
    rule = get_rule("adamw8bit")
    group = {**rule.defaults, "eps": 1e-8, "kernel": "torch"}
    start = _8bit_state(shape, group, seed=0)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * torch.logspace(-5, 0, shape[-1])
    mine, theirs = deepcopy(start), deepcopy(start)
    d, f = rule.update(grad, mine, group)
    d_fused, f_fused = rule.update(grad, theirs, {**group, "kernel": "bitsandbytes"})
    assert f_fused == 1.0 and theirs["q8_step"] == mine["q8_step"] == 4
    torch.testing.assert_close(d_fused, d * f, rtol=2e-6, atol=1e-7)
    beta1, beta2 = group["betas"]
    before = rule.moments(start)
    unrounded = {"m": beta1 * before["m"] + (1 - beta1) * grad, "v": beta2 * before["v"] + (1 - beta2) * grad**2}
    for key, signed in (("m", True), ("v", False)):
        absmax = mine[f"q8_{key}_absmax"]
        assert torch.equal(theirs[f"q8_{key}_absmax"], absmax)
        scale = absmax.repeat_interleave(BLOCK)[: grad.numel()].view(shape)
        normed, code = unrounded[key] / scale, dynamic_map(signed)
        err_mine = (code[mine[f"q8_{key}"].long()] - normed).abs()
        err_theirs = (code[theirs[f"q8_{key}"].long()] - normed).abs()
        assert bool((err_mine <= err_theirs + 1e-7).all()), key  # the torch code rounds to the nearest code
        assert float(err_theirs.max()) <= float((code[1:] - code[:-1]).max()) + 1e-6, key


def test_8bit_bitsandbytes_kernel_steps_full_rank_weights_in_place():
    """A float32 full-rank weight is stepped by the kernel in place; decoupled weight decay stays the
    optimizer's. Each step starts both paths from the fused run's weight and codes, so errors do not compound."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(48, 512)), torch.nn.Parameter(torch.zeros(48, 512))
    fused = SubspaceOptimizer([a], lr=1e-2, base="adamw8bit", kernel="bitsandbytes", weight_decay=0.1)
    plain = SubspaceOptimizer([b], lr=1e-2, base="adamw8bit", kernel="torch", weight_decay=0.1)
    for i in range(3):
        g = torch.randn(48, 512) * 10.0**-i
        b.data.copy_(a.detach())
        if fused.state:
            plain.state[b]["rule"] = deepcopy(fused.state[a]["rule"])
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
        assert fused.state[a]["rule"]["q8_step"] == plain.state[b]["rule"]["q8_step"] == i + 1


def test_8bit_kernel_option_is_checked_and_auto_keeps_cpu_on_torch(monkeypatch):
    with pytest.raises(ValueError, match="kernel must be one of auto, torch, bitsandbytes"):
        SubspaceOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], base="adamw8bit", kernel="cuda")
    from gradspace.rules.adam8bit import fused_kernel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ValueError, match="kernel='bitsandbytes' needs bitsandbytes: pip install bitsandbytes"):
        SubspaceOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], base="adamw8bit", kernel="bitsandbytes")
    group = dict(get_rule("adamw8bit").defaults)
    assert fused_kernel(group, torch.zeros(2)) is None  # auto on CPU: the torch code
    assert fused_kernel({**group, "kernel": "bitsandbytes", "correct_bias": False}, torch.zeros(2)) is None
