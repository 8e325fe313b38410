"""The batched step (``batched=True``) against the per-weight loop: the same weights and state to float32 rounding
for every preset and inner rule (weights that cannot batch take the loop), and operations per step that grow
with the number of distinct shapes, not of weights."""

from __future__ import annotations

import pytest
import torch

from gradspace.bench.step import operations
from gradspace.components import flat_items
from gradspace.methods import METHODS, create_optimizer
from gradspace.rules import RULES
from gradspace.train.models import build_llama


def _llama(layers: int = 2, dtype=torch.float32):
    torch.manual_seed(0)
    return build_llama("tiny", vocab_size=96, num_hidden_layers=layers).to(dtype)


def _grads(model, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) * 10.0 ** -(i % 3) for p in model.parameters()]
            for i in range(steps)]  # fmt: skip


def _train(method, rule, batched, steps=7, dtype=torch.float32, **options):
    model = _llama(dtype=dtype)
    kw = {} if METHODS[method] is None else {"rank": 8, "update_proj_gap": 3}
    opt = create_optimizer(method, model, lr=1e-2, base=rule, weight_decay=0.1, batched=batched, **kw, **options)
    for grads in _grads(model, steps):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    return model, opt


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_steps_match_the_loop(method, rule):
    """Seven steps with subspace updates at steps 1, 4 and 7 (the loop's) and batched steps between them."""
    options = {"kernel": "torch"} if rule == "adamw8bit" else {}
    loop_model, loop = _train(method, rule, False, **options)
    batch_model, batch = _train(method, rule, True, **options)
    for (name, a), b in zip(loop_model.named_parameters(), batch_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for p, q in zip(loop_model.parameters(), batch_model.parameters()):
        mine, theirs = dict(flat_items(loop.state[p])), dict(flat_items(batch.state[q]))
        assert mine.keys() == theirs.keys()
        for k, v in mine.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(theirs[k], v, rtol=1e-4, atol=1e-6, msg=k)
            elif not isinstance(v, torch.Tensor):
                assert theirs[k] == v, k
    assert loop.diagnostics().keys() == batch.diagnostics().keys()


def test_batched_bfloat16_weights_match_the_loop():
    loop_model, _ = _train("galore", "adamw", False, dtype=torch.bfloat16)
    batch_model, _ = _train("galore", "adamw", True, dtype=torch.bfloat16)
    for (name, a), b in zip(loop_model.named_parameters(), batch_model.parameters()):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=1e-3, msg=name)  # bfloat16's rounding


def test_batched_energy_is_the_loops():
    _, loop = _train("galore", "adamw", False, steps=5)
    _, batch = _train("galore", "adamw", True, steps=5)  # step 5 batched
    a, b = loop.diagnostics()["weights"], batch.diagnostics()["weights"]
    assert len(a) == 14 and a.keys() == b.keys()
    for name, d in a.items():
        assert 0.0 < d["energy"] < 1.0
        assert b[name]["energy"] == pytest.approx(d["energy"], rel=1e-5), name


def _top_level_ops(opt, model, grads) -> int:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    return operations(opt.step)


@pytest.mark.parametrize("method", ["galore", "apollo"])
def test_operations_per_step_grow_by_the_large_products_alone(method):
    """torch.profiler's outermost aten operations of one non-update step (the proxy for kernel launches), with two
    more blocks (14 more projected weights): the loop adds about 16 (GaLore) or 38 (APOLLO) per weight, the batched
    step only each weight's projection and write-back (and APOLLO's column norms of the gradient), besides the
    non-finite check's one sum per gradient (one multi-tensor norm on CUDA)."""
    counts = {}
    for batched in (False, True):
        for layers in (2, 4):
            model = _llama(layers)
            opt = create_optimizer(method, model, lr=1e-3, rank=8, update_proj_gap=100, batched=batched)
            grads = _grads(model, 2)
            _top_level_ops(opt, model, grads[0])  # the first step builds the bases
            counts[batched, layers] = _top_level_ops(opt, model, grads[1])
    loop, batch = (counts[b, 4] - counts[b, 2] for b in (False, True))
    per_weight = {"galore": 2, "apollo": 4}[method] + 1  # + the non-finite check's sum of each gradient on CPU
    assert batch <= per_weight * 14 + 4, counts  # + the 4 norm weights' sums
    assert loop >= 3 * batch, counts
