"""A rank per weight for a byte budget: the bytes go where the gradient's energy is, the state stays within the
budget, the allocation is recorded and a resumed run rebuilds it."""

import json

import pytest
import torch
from torch import nn

import gradspace
from conftest import run
from gradspace import METHODS
from gradspace.bench.formula import weight_bytes
from gradspace.optimizer import optimizer_state_bytes
from gradspace.ranks import allocate_ranks
from test_cli import SMALL


def weight_with_gradient(spectrum):
    """A 64 x 96 weight whose gradient has the given singular values."""
    g = torch.Generator().manual_seed(len(spectrum))
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(96, 64, generator=g))
    w = nn.Parameter(torch.zeros(64, 96))
    w.grad = u @ torch.diag(torch.tensor(spectrum)) @ v.T
    return w


def state(weights, ranks):
    return sum(weight_bytes(tuple(w.shape), 4, "galore", ranks[n], {"base": "adamw"}) for n, w in weights.items())


def test_the_budget_goes_where_the_energy_is():
    steep = weight_with_gradient([10.0 * 0.5**i for i in range(64)])  # nearly all of it in a few directions
    flat = weight_with_gradient([1.0] * 64)  # spread over all 64
    weights = {"steep": steep, "flat": flat}
    budget = state(weights, {"steep": 16, "flat": 16})  # what rank 16 for both costs
    ranks = allocate_ranks(weights, budget, METHODS["galore"], max_rank=48, step=1)
    assert ranks["flat"] > 16 > ranks["steep"]  # the steep one's energy is captured long before rank 16
    assert state(weights, ranks) <= budget
    more = {**ranks, "flat": ranks["flat"] + 1}
    assert state(weights, more) > budget or ranks["flat"] == 48  # nothing left for another step of rank


def test_without_gradients_the_prior_splits_alike_weights_alike_and_too_little_is_an_error():
    weights = {n: nn.Parameter(torch.zeros(64, 96)) for n in ("a", "b", "c")}
    budget = state(weights, dict.fromkeys(weights, 12))
    ranks = allocate_ranks(weights, budget, METHODS["galore"], step=1)
    assert len(set(ranks.values())) == 1 and state(weights, ranks) <= budget
    with pytest.raises(ValueError, match="does not hold even rank 1"):
        allocate_ranks(weights, 10, METHODS["galore"])


def test_create_optimizer_keeps_its_state_within_the_budget(tmp_path):
    from gradspace.train.models import build_llama

    torch.manual_seed(0)
    model = build_llama("mini", vocab_size=200)
    x = torch.randint(0, 200, (4, 64))
    model(input_ids=x, labels=x).loss.backward()
    uniform = gradspace.create_optimizer("galore", model, rank=16)
    uniform.step()
    budget = optimizer_state_bytes(uniform)
    opt = gradspace.create_optimizer("galore", model, rank=48, memory_budget=budget)  # the same gradients
    opt.step()
    assert optimizer_state_bytes(opt) <= budget
    ranks = [w["rank"] for w in opt.diagnostics()["weights"].values()]
    assert len(set(ranks)) > 1 and max(ranks) <= 48
    names = {id(p): n for n, p in model.named_parameters()}
    recorded = {names[id(p)]: g["rank"] for g in opt.param_groups if "rank" in g for p in g["params"]}
    again = gradspace.create_optimizer("galore", model, memory_budget=recorded)
    assert [(g.get("rank"), len(g["params"])) for g in again.param_groups] == [
        (g.get("rank"), len(g["params"])) for g in opt.param_groups
    ]
    with pytest.raises(ValueError, match="the model itself"):
        gradspace.create_optimizer("galore", list(model.parameters()), memory_budget=budget)


def test_a_run_with_a_memory_budget_records_its_ranks_and_resumes_exactly(tmp_path, capsys):
    out, whole = tmp_path / "cut", tmp_path / "whole"
    shape = ["--preset", "mini", "--batch-size", "4", "--seq-len", "32"]
    assert run("plan", *shape, "--rank", "16", "--json") == 0
    peak = json.loads(capsys.readouterr().out)["peak_bytes"]  # the rank-16 run's: a budget that binds
    flags = [*SMALL, *shape, "--rank", "64", "--memory-budget", f"{peak}B", "--save-every", "3"]
    assert run("pretrain", *flags, "--out", whole) == 0
    ranks = json.loads((whole / "config.json").read_text())["budget_ranks"]
    assert ranks and len(set(ranks.values())) > 1 and max(ranks.values()) <= 64
    assert run("pretrain", *flags, "--out", out, "--stop-after", "3") == 130
    assert run("pretrain", "--resume", out, "--threads", "1") == 0
    a = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]
    b = torch.load(sorted((whole / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["budget_ranks"] == ranks
