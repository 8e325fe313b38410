"""DDP and FSDP2 on CPU: the test starts two gloo processes itself (one spawn runs every preset).

Every preset of METHODS trains a two-layer net across several subspace updates: with DDP (``distributed=None`` and
``"shard_updates"``) and with FSDP2. Ranks must agree exactly, DDP must match one process on the same global batch,
sharded updates must give the replicated run's exact bits, and FSDP2 must match DDP within float32 tolerance.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradspace import SubspaceOptimizer, create_optimizer
from gradspace.distributed import owners, replicate, wrap_model
from gradspace.layerwise import Layerwise
from gradspace.methods import METHODS
from gradspace.train.loop import train as train_loop

WORLD = 2
STEPS = 14  # with GAP 4: bases move at steps 4, 8 and 12 (adarank: by its criteria, within [1, 4])
GAP = 4
BATCH = 8  # global batch; each rank takes BATCH // WORLD rows
TOL = {"rtol": 1e-4, "atol": 2e-6}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)  # weight 40 x 24: basis on the right (local under FSDP2)
        self.down = nn.Linear(40, 24)  # weight 24 x 40: basis on the left (gathered under FSDP2)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int, rank: int | None = None):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, 24, generator=g), torch.randn(BATCH, 24, generator=g)
    if rank is None:
        return x, y
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[part], y[part]


def optimizer(name: str, model: nn.Module, **kwargs):
    projection = {} if METHODS[name] is None else {"rank": 4, "update_proj_gap": GAP, "target_modules": "all-linear"}
    return create_optimizer(name, model, lr=1e-2, weight_decay=0.01, **projection, **kwargs)


def train(model, opt, steps, rank=None, start=0):
    for t in range(start, start + steps):
        x, y = batch(t, rank)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def train_accumulating(model, opt, steps, rank, ddp: bool):
    """Two micro-batches per step (the rank's two halves): DDP reduces only the second (``no_sync``); layer-wise
    mode counts its own windows."""
    for t in range(steps):
        x, y = batch(t, rank)
        opt.zero_grad(set_to_none=True)
        for i, half in enumerate((slice(0, len(x) // 2), slice(len(x) // 2, None))):
            with model.no_sync() if ddp and i == 0 else contextlib.nullcontext():
                (nn.functional.mse_loss(model(x[half]), y[half]) / 2).backward()
        opt.step()


def full(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------------ the workers
def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out: dict = {}
        for name in METHODS:
            for mode in (None, "shard_updates"):
                model = wrap_model(make_net(), "ddp")
                opt = optimizer(name, model.module, distributed=mode)
                train(model, opt, STEPS, rank)
                out[("ddp", name, mode)] = full(model.module)
                out[("updates", name, mode)] = [st.get("updates", 0) for st in opt.state.values()]
            for mode in (None, "shard_updates") if name in ("galore", "adarank", "subtrack++") else (None,):
                model = make_net()
                wrap_model(model, "fsdp2", blocks=[model.up, model.down])
                opt = optimizer(name, model, distributed=mode)
                train(model, opt, STEPS, rank)
                out[("fsdp2", name, mode)] = full(model)
            model = fsdp2_net()  # layer-wise under FSDP2: each block's weights step after its reduce-scatter
            opt = optimizer(name, model)
            layerwise = Layerwise(opt)
            out[("fsdp2-layerwise-early", name)] = _steps_in_backward(model, opt, rank)
            train(model, opt, STEPS - 1, rank, start=1)
            out[("fsdp2-layerwise", name)] = full(model)
            layerwise.remove()
            model = replicate(make_net())  # layer-wise data parallelism: each gradient averaged, then stepped
            opt = optimizer(name, model)
            Layerwise(opt, process_group=dist.group.WORLD)
            train(model, opt, STEPS, rank)
            out[("layerwise", name)] = full(model)
        for name in ("galore", "grassjump", "subtrack++"):  # projected accumulation (galore, grassjump), and not
            model = wrap_model(make_net(), "ddp")
            opt = optimizer(name, model.module)
            train_accumulating(model, opt, STEPS, rank, ddp=True)
            out[("ddp-accum", name)] = full(model.module)
            model = replicate(make_net())
            opt = optimizer(name, model)
            Layerwise(opt, accumulation_steps=2, process_group=dist.group.WORLD)
            train_accumulating(model, opt, STEPS, rank, ddp=False)
            out[("layerwise-accum", name)] = full(model)
            model = fsdp2_net()
            opt = optimizer(name, model)
            train_accumulating(model, opt, STEPS, rank, ddp=False)
            out[("fsdp2-accum", name)] = full(model)
            model = fsdp2_net()
            opt = optimizer(name, model)
            Layerwise(opt, accumulation_steps=2)
            train_accumulating(model, opt, STEPS, rank, ddp=False)
            out[("fsdp2-layerwise-accum", name)] = full(model)
        out["dcp"] = {name: _fsdp2_checkpoint(rank, name, out_dir) for name in METHODS}
        out["nan"] = _nan_on_one_rank(rank)
        out["resume"] = _resume_matches(rank)
        model = make_net()
        wrap_model(model, "fsdp2", blocks=[model.up, model.down])
        try:
            optimizer("galore", model, base="adafactor")
        except ValueError as err:
            out["fsdp_rule_error"] = str(err)
        out["skipped"] = _nonfinite_shard_skips_everywhere(rank)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _resume_matches(rank: int) -> dict[str, bool]:
    """DDP with sharded updates: save at step 4 (an update step), load into fresh objects, finish; compare."""
    out = {}
    for name in ("galore", "adarank", "subtrack++", "grasswalk"):
        model = wrap_model(make_net(), "ddp")
        opt = optimizer(name, model.module, distributed="shard_updates")
        train(model, opt, 4, rank)
        saved_model, saved_opt = roundtrip(model.module.state_dict()), roundtrip(opt.state_dict())
        train(model, opt, 5, rank, start=4)
        expected = full(model.module)
        net = make_net()
        net.load_state_dict(saved_model)
        model = wrap_model(net, "ddp")
        opt = optimizer(name, model.module, distributed="shard_updates")
        opt.load_state_dict(saved_opt)
        train(model, opt, 5, rank, start=4)
        out[name] = all(torch.equal(expected[k], v) for k, v in full(model.module).items())
    return out


def _steps_in_backward(model, opt, rank: int) -> dict:
    """The first step of layer-wise FSDP2, looked at between backward and ``opt.step()``: every weight has
    stepped inside backward, after its block's reduce-scatter, and dropped its gradient."""
    before = full(model)
    x, y = batch(0, rank)
    nn.functional.mse_loss(model(x), y).backward()
    after = full(model)
    moved = {n: not torch.equal(before[n], after[n]) for n in before}
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    opt.step()  # the rest of step 1
    opt.zero_grad(set_to_none=True)
    return {"moved": moved, "grads": grads}


CUT = 6  # FSDP2 checkpoints are written at step 6, after the first subspace update


def fsdp2_net() -> Net:
    model = make_net()
    wrap_model(model, "fsdp2", blocks=[model.up, model.down])
    return model


def _fsdp2_checkpoint(rank: int, name: str, out_dir: str) -> dict:
    """FSDP2: save through DCP at step CUT, finish; read the checkpoint into a fresh FSDP2 model and optimizer and
    finish again. The folder stays for the one-process resume (``test_fsdp2_checkpoint_resumes_in_one_process``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from gradspace.train import sharded

    folder = os.path.join(out_dir, f"dcp-{name}")
    model = fsdp2_net()
    opt = optimizer(name, model)
    train(model, opt, CUT, rank)
    rest = sharded.save(folder, model, opt)
    if rank == 0:
        torch.save(rest, os.path.join(out_dir, f"dcp-{name}.pt"))
    train(model, opt, STEPS - CUT, rank, start=CUT)
    expected = full(model)
    model = fsdp2_net()
    opt = optimizer(name, model)
    sharded.load(folder, roundtrip(rest), model, opt, fsdp=True)
    train(model, opt, STEPS - CUT, rank, start=CUT)
    out = {"expected": expected, "resumed": full(model)}
    one = make_net()  # a one-process checkpoint at step CUT, cut into each rank's part
    one_opt = optimizer(name, one)
    train(one, one_opt, CUT)
    saved_model, saved_opt = roundtrip(one.state_dict()), roundtrip(one_opt.state_dict())
    model = fsdp2_net()
    opt = optimizer(name, model)
    set_model_state_dict(model, saved_model, options=StateDictOptions(full_state_dict=True))
    opt.load_state_dict(sharded.shard_full_state(opt, saved_opt))
    train(model, opt, STEPS - CUT, rank, start=CUT)
    out["from_one_process"] = full(model)
    return out


class Out(dict):
    @property
    def loss(self):
        return self["loss"]


class LossNet(nn.Module):
    """The Net with a Hugging Face-like output, for the training loop."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, input_ids, labels):
        return Out(loss=nn.functional.mse_loss(self.net(input_ids), labels))


def _nan_on_one_rank(rank: int) -> dict:
    """Only rank 1's loss is NaN at step 2: every rank must raise, or skip, at that step (else rank 0 would wait
    in the gradient all-reduce for ever)."""

    def all_ok(ok: bool) -> bool:
        flag = torch.tensor([1.0 if ok else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def batches():
        for t in range(4):
            x, y = batch(t, rank)
            yield {"input_ids": x.fill_(float("nan")) if (rank, t) == (1, 1) else x, "labels": y}

    out = {}
    for mode in ("error", "skip"):
        model = wrap_model(LossNet(), "ddp")
        opt = optimizer("galore", model.module)
        try:
            result = train_loop(model, opt, batches(), 4, grad_clip=0, skip_nonfinite=mode == "skip", all_finite=all_ok)
            out[mode] = (result["skipped_steps"], [r["step"] for r in result["history"]], full(model.module))
        except FloatingPointError as err:
            out[mode] = str(err)
    return out


def _nonfinite_shard_skips_everywhere(rank: int) -> tuple[int, bool]:
    """FSDP2: an inf in rank 1's rows only; with nonfinite="skip" both ranks must skip (or they would diverge)."""
    model = make_net()
    wrap_model(model, "fsdp2", blocks=[model.up, model.down])
    opt = optimizer("galore", model, nonfinite="skip")
    before = full(model)
    x, y = batch(0, rank)
    nn.functional.mse_loss(model(x), y).backward()
    if rank == 1:
        model.up.weight.grad.to_local()[0, 0] = float("inf")
    opt.step()
    return opt.skipped_steps, all(torch.equal(before[k], v) for k, v in full(model).items())


HANG = 300  # seconds: the workers take about a minute; a collective that never completes fails the tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import time

    tmp = str(tmp_path_factory.mktemp("distributed"))
    ctx = mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=False)
    deadline = time.monotonic() + HANG
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the distributed workers did not finish in {HANG} s: a rank is stuck in a collective")
    out = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    out[0]["dir"] = tmp
    return out


def single_process(name: str) -> dict[str, torch.Tensor]:
    """The reference: one process on the same global batch (its gradient equals the ranks' average up to
    float rounding, which no preset may amplify; OSD did before it stopped stepping P on the initialising
    step). The optimizer must not touch the global RNG."""
    model = make_net()
    opt = optimizer(name, model)
    rng = torch.get_rng_state()
    train(model, opt, STEPS)
    assert torch.equal(rng, torch.get_rng_state()), f"{name} consumed the global RNG"
    return full(model)


def assert_close(a: dict, b: dict, what: str) -> None:
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], **TOL, msg=lambda m, k=key: f"{what}, {k}: {m}")


# -------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", list(METHODS))
def test_ddp_ranks_agree_exactly_and_match_one_process(runs, name):
    ref = single_process(name)
    for mode in (None, "shard_updates"):
        r0, r1 = runs[0][("ddp", name, mode)], runs[1][("ddp", name, mode)]
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{name} {mode}: ranks differ"
        assert_close(r0, ref, f"{name} DDP {mode} vs one process")
        assert not torch.equal(r0["up.weight"], make_net().up.weight), "nothing trained"


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS[n] is not None])
def test_sharded_updates_give_the_replicated_bits(runs, name):
    replicated, sharded = runs[0][("ddp", name, None)], runs[0][("ddp", name, "shard_updates")]
    assert all(torch.equal(replicated[k], sharded[k]) for k in replicated)
    assert runs[0][("updates", name, None)] == runs[1][("updates", name, "shard_updates")]
    assert max(runs[0][("updates", name, None)]) >= 3 or name.startswith("osd")  # osd moves every step instead


@pytest.mark.parametrize("name", list(METHODS))
def test_layerwise_data_parallel_matches_ddp(runs, name):
    r0, r1 = runs[0][("layerwise", name)], runs[1][("layerwise", name)]
    assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{name}: ranks differ"
    assert_close(r0, runs[0][("ddp", name, None)], f"{name} layer-wise data-parallel vs DDP")


@pytest.mark.parametrize("name", ["galore", "grassjump", "subtrack++"])
def test_layerwise_data_parallel_accumulation_matches_ddp_no_sync(runs, name):
    for r in range(WORLD):
        assert_close(runs[r][("layerwise-accum", name)], runs[0][("ddp-accum", name)], f"{name} rank {r}")
    assert not torch.equal(runs[0][("ddp-accum", name)]["up.weight"], runs[0][("ddp", name, None)]["up.weight"])


def test_a_nan_loss_on_one_rank_makes_every_rank_decide_the_same(runs):
    errors = [r["nan"]["error"] for r in runs]
    assert "loss is nan at step 2" in errors[1] and "not finite on another rank at step 2" in errors[0]
    (skipped0, steps0, weights0), (skipped1, steps1, weights1) = (r["nan"]["skip"] for r in runs)
    assert skipped0 == skipped1 == 1 and steps0 == steps1 == [1, 2, 3, 4]
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)


@pytest.mark.parametrize("name", list(METHODS))
def test_layerwise_fsdp2_steps_each_block_in_backward_and_matches_fsdp2(runs, name):
    for r in range(WORLD):
        early = runs[r][("fsdp2-layerwise-early", name)]
        assert early["moved"] == dict.fromkeys(("up.weight", "up.bias", "down.weight", "down.bias"), True)
        assert early["grads"] == dict.fromkeys(("up.weight", "up.bias", "down.weight", "down.bias"), False)
        expected = runs[r][("fsdp2", name, None)]
        assert_close(runs[r][("fsdp2-layerwise", name)], expected, f"{name} layer-wise FSDP2 rank {r}")


@pytest.mark.parametrize("name", ["galore", "grassjump", "subtrack++"])
def test_layerwise_fsdp2_accumulation_matches_fsdp2(runs, name):
    for r in range(WORLD):
        got, expected = runs[r][("fsdp2-layerwise-accum", name)], runs[r][("fsdp2-accum", name)]
        assert_close(got, expected, f"{name} layer-wise FSDP2 with accumulation, rank {r}")


@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp2_matches_ddp(runs, name):
    for r in range(WORLD):
        assert_close(runs[r][("fsdp2", name, None)], runs[0][("ddp", name, None)], f"{name} FSDP2 rank {r} vs DDP")


@pytest.mark.parametrize("name", ["galore", "adarank", "subtrack++"])
def test_fsdp2_with_sharded_updates_gives_the_replicated_bits(runs, name):
    expected = runs[0][("fsdp2", name, None)]
    for r in range(WORLD):
        got = runs[r][("fsdp2", name, "shard_updates")]
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"rank {r}"


@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp2_resumes_on_two_ranks_from_its_checkpoint_and_from_one_process(runs, name):
    for r in range(WORLD):
        got = runs[r]["dcp"][name]
        assert_close(got["resumed"], got["expected"], f"{name} FSDP2 resumed from DCP, rank {r}")
        assert_close(got["from_one_process"], got["expected"], f"{name} FSDP2 resumed from one process, rank {r}")


@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp2_checkpoint_resumes_in_one_process(runs, name):
    """The checkpoint two FSDP2 ranks wrote, read whole into one process (no process group): it finishes the run
    on the global batch as the two ranks did."""
    from gradspace.train import sharded

    tmp = runs[0]["dir"]
    model = make_net()
    opt = optimizer(name, model)
    rest = torch.load(os.path.join(tmp, f"dcp-{name}.pt"), weights_only=True)
    sharded.load(os.path.join(tmp, f"dcp-{name}"), rest, model, opt, fsdp=False)
    assert set(opt.state_dict()["state"]) == set(rest["state"])  # every parameter's state came back
    train(model, opt, STEPS - CUT, start=CUT)
    assert_close(full(model), runs[0]["dcp"][name]["expected"], f"{name} FSDP2 checkpoint resumed in one process")


def test_fsdp2_checkpoint_stores_each_ranks_rows_once(runs):
    """Each rank writes only its rows: of the model, of the unprojected biases' moments, and of the moments of
    ``up``, which steps on its rows; ``down``'s moments (its gradient is gathered) and both bases are the same on
    every rank and stored once."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from gradspace.train import sharded

    meta = sharded.read_metadata(os.path.join(runs[0]["dir"], "dcp-galore")).state_dict_metadata
    chunks = {k: len(v.chunks) for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}
    net = make_net()
    names = {id(p): n for n, p in net.named_parameters()}
    numbering = [names[id(p)] for g in optimizer("galore", net).param_groups for p in g["params"]]
    saved = {(numbering[int(k.split(".")[1])], k.split(".", 2)[2]): n for k, n in chunks.items() if "optimizer." in k}
    expected = {("up.weight", "basis"): 1, ("down.weight", "basis"): 1}
    moments = ("rule.exp_avg", "rule.exp_avg_sq")  # the inner rule's part of the state (gradspace.components)
    expected |= {("up.weight", m): 2 for m in moments}
    expected |= {("down.weight", m): 1 for m in moments}
    expected |= {(b, m): 2 for b in ("up.bias", "down.bias") for m in moments}
    assert {k: v for k, v in saved.items() if k in expected} == expected, saved
    assert all(n == WORLD for k, n in chunks.items() if k.startswith("model.")), chunks


def test_optimizer_checkpoint_resumes_bit_identically_under_ddp(runs):
    for r in range(WORLD):
        assert runs[r]["resume"] == {"galore": True, "adarank": True, "subtrack++": True, "grasswalk": True}


def test_fsdp2_rejects_a_rule_whose_state_is_not_elementwise(runs):
    assert "adafactor" in runs[0]["fsdp_rule_error"] and "adamw, lion, sgd" in runs[0]["fsdp_rule_error"]


def test_fsdp2_nonfinite_gradient_on_one_shard_skips_on_every_rank(runs):
    assert [r["skipped"] for r in runs] == [(1, True), (1, True)]


# ------------------------------------------------------------------------------ no process group needed
def test_flattened_parameter_in_a_projected_group_is_an_error():
    flat = nn.Parameter(torch.zeros(40 * 24))  # what FSDP1 (use_orig_params=False) or ZeRO hand the optimizer
    with pytest.raises(ValueError, match=r"FSDP1.*DeepSpeed ZeRO.*fully_shard"):
        SubspaceOptimizer([{"params": [flat], "rank": 4}])


def test_parameter_flattened_after_construction_does_not_fall_back_to_full_rank():
    p = nn.Parameter(torch.randn(40, 24))
    opt = SubspaceOptimizer([{"params": [p], "rank": 4}])
    p.data = p.data.flatten()  # ZeRO-style: the data is swapped for a flat view after the optimizer was built
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"only 2-D weights can be projected.*FSDP1"):
        opt.step()
    assert not opt.state[p]


def test_shard_updates_without_a_process_group_is_an_error():
    with pytest.raises(ValueError, match="init_process_group"):
        SubspaceOptimizer([nn.Parameter(torch.zeros(4, 4))], distributed="shard_updates")


def test_owners_balance_by_cost_deterministically():
    assert owners([1.0, 5.0, 3.0, 3.0], 2) == [0, 0, 1, 1]  # largest first: 5 -> 0, 3 -> 1, 3 -> 1, 1 -> 0
    assert owners([2.0, 2.0, 2.0], 3) == [0, 1, 2]
