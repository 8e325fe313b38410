"""The CUDA paths: every preset x inner rule in float32 and bfloat16, every tracker, the 8-bit rule's bitsandbytes
kernel, ``torch.compile`` of a step, and DDP/FSDP2 over nccl, on ``GRADSPACE_TEST_DEVICE`` (default ``cuda``).

Marked ``cuda``: skipped where the device is missing. ``python -m gradspace.bench gpu`` runs them on the GPU;
its ``--dry-run`` runs the same tests with ``GRADSPACE_TEST_DEVICE=cpu`` (tiny shapes), so CI proves they work
before a GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
from torch import nn

from conftest import batches, make_model, projected_groups
from gradspace import SubspaceOptimizer
from gradspace.bench.update import update_call
from gradspace.methods import METHODS, create_optimizer
from gradspace.rules import RULES, get_rule
from gradspace.trackers import TRACKERS

DEVICE = torch.device(os.environ.get("GRADSPACE_TEST_DEVICE", "cuda"))


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu"


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not _available(DEVICE),
        reason=f"no {DEVICE} device (GRADSPACE_TEST_DEVICE=cpu runs these on CPU: python -m gradspace.bench gpu "
        "--dry-run)",
    ),
]

#: presets whose every step is deterministic (no random draw), so a float32 run on DEVICE matches one on the CPU
#: up to float rounding; the others draw their bases from seeded generators on the weight's device, and a CUDA
#: generator's stream is not the CPU's
DETERMINISTIC = ("adamw", "galore", "fira", "subtrack", "subtrack++", "osd", "osd-code", "q-galore")


def _run(method: str, rule: str, device, dtype, steps: int = 4, **options):
    model = make_model(dtype=dtype).to(device)
    if method != "adamw":  # full-rank AdamW takes no projection options
        options.update(rank=6, update_proj_gap=2, target_modules=["up", "mid", "down"])
    opt = create_optimizer(method, model, lr=1e-2, base=rule, weight_decay=0.01, **options)
    losses = []
    for x, y in batches(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x.to(device, dtype)).float(), y.to(device))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, opt, losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_preset_and_rule_trains_on_the_device(method, rule, dtype):
    """Four steps with two subspace refreshes: finite weights that moved, state kept on the device."""
    start = make_model(dtype=dtype)
    model, opt, losses = _run(method, rule, DEVICE, dtype)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    for (name, p), p0 in zip(model.named_parameters(), start.parameters()):
        assert p.device.type == DEVICE.type and p.dtype == dtype, name
        assert bool(torch.isfinite(p).all()), name
        assert not torch.equal(p.detach().cpu(), p0.detach()), f"{name} did not move"
    for state in opt.state.values():
        for value in _tensors(state):
            assert value.device.type == DEVICE.type


def _tensors(state: dict):
    for value in state.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


@pytest.mark.parametrize("rule", ["adamw", "adamw8bit", "lion", "adafactor", "sgd"])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_float32_on_the_device_matches_the_cpu(method, rule):
    # bitsandbytes' kernel (the 8-bit rule's CUDA default when installed) rounds some codes differently: the torch
    # code is compared here, the kernel in its own parity test below
    options = {"kernel": "torch"} if rule == "adamw8bit" else {}
    on_device, _, losses = _run(method, rule, DEVICE, torch.float32, **options)
    on_cpu, _, cpu_losses = _run(method, rule, "cpu", torch.float32, **options)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(cpu_losses), rtol=1e-3, atol=1e-5)
    for (name, p), q in zip(on_device.named_parameters(), on_cpu.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["galore", "apollo", "apollo-mini"])
def test_batched_steps_match_the_loop_on_the_device(method, dtype):
    loop, _, _ = _run(method, "adamw", DEVICE, dtype, steps=5)
    batch, _, _ = _run(method, "adamw", DEVICE, dtype, steps=5, batched=True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for (name, a), b in zip(loop.named_parameters(), batch.parameters()):
        torch.testing.assert_close(b.float(), a.float(), msg=name, **tol)


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_every_tracker_moves_an_orthonormal_basis_on_the_device(name):
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(32, 12, generator=gen) @ torch.randn(12, 96, generator=gen)).to(DEVICE)
    move = update_call(name, g, rank=8)
    out = move()
    basis = out[0] if isinstance(out, tuple) else out
    if isinstance(basis, torch.Tensor) and basis.dim() == 2:
        assert basis.device.type == DEVICE.type and bool(torch.isfinite(basis).all())
        if TRACKERS[name].orthonormal:
            eye = torch.eye(basis.shape[1], device=DEVICE)
            torch.testing.assert_close(basis.mT @ basis, eye, atol=1e-4, rtol=0)


def test_randomized_svd_galore_trains_on_the_device():
    model = make_model().to(DEVICE)
    opt = SubspaceOptimizer(projected_groups(model, gap=2), lr=1e-2, svd="randomized")
    for x, y in batches(4):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x.to(DEVICE)), y.to(DEVICE)).backward()
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.state[model.mid.weight]["updates"] == 1  # the first basis at step 1, one refresh at step 3


def test_8bit_rule_on_the_device_against_bitsandbytes():
    """The 8-bit rule's default kernel on the device (bitsandbytes' on CUDA when installed) against its torch
    code, one step from the same codes: the same update to float32 rounding."""
    pytest.importorskip("bitsandbytes")
    rule = get_rule("adamw8bit")
    group = dict(rule.defaults)
    shape = (96, 512)
    gen = torch.Generator().manual_seed(0)
    state = {}
    rule.init_state(state, torch.zeros(shape, device=DEVICE), group)
    for _ in range(2):
        rule.update(torch.randn(shape, generator=gen).to(DEVICE), state, {**group, "kernel": "torch"})
    grad = torch.randn(shape, generator=gen).to(DEVICE)
    kernel = "auto" if DEVICE.type == "cuda" else "bitsandbytes"
    fused, plain = deepcopy(state), deepcopy(state)
    d, f = rule.update(grad, fused, {**group, "kernel": kernel})
    d_ref, f_ref = rule.update(grad, plain, {**group, "kernel": "torch"})
    torch.testing.assert_close(d * f, d_ref * f_ref, rtol=2e-6, atol=1e-7)
    for key in ("q8_m_absmax", "q8_v_absmax"):
        assert torch.equal(fused[key], plain[key])


def test_compiled_step_matches_eager():
    """``torch.compile`` of ``optimizer.step`` (inductor on CUDA; dynamo's eager backend on the CPU dry run,
    which needs no compiler): the same weights as the eager step."""
    backend = "inductor" if DEVICE.type == "cuda" else "eager"
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make_model().to(DEVICE)
        opt = SubspaceOptimizer(projected_groups(model, gap=3), lr=1e-2)
        step = torch.compile(opt.step, backend=backend) if compiled else opt.step
        for x, y in batches(4):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x.to(DEVICE)), y.to(DEVICE)).backward()
            step()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_peak_memory_is_max_memory_allocated_on_cuda():
    if DEVICE.type != "cuda":
        pytest.skip("max_memory_allocated is CUDA's")
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    model, opt, _ = _run("galore", "adamw", DEVICE, torch.float32)
    held = torch.cuda.memory_allocated(DEVICE) - before  # the model and its state
    assert held >= sum(p.numel() * 4 for p in model.parameters()) and opt.state
    assert torch.cuda.max_memory_allocated(DEVICE) >= torch.cuda.memory_allocated(DEVICE)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_ddp_and_fsdp2_over_nccl(fsdp, tmp_path):
    if DEVICE.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("DDP and FSDP2 over nccl need two CUDA devices (this machine has fewer)")
    argv = ["--preset", "mini", "--tokenizer", "chars", "--steps", "4", "--eval-every", "0", "--device", "cuda"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gradspace", "pretrain"]
    cmd += [*argv, *(["--fsdp"] if fsdp else []), "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
