"""docs/extending.md's examples run as written: the preset line, the tracker class and the option line."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import gradspace
from conftest import batches, make_model, projected_groups
from gradspace.train import options

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def clean():
    yield
    for name in ("galore-reset", "toprows"):
        if name in gradspace.METHODS:
            gradspace.unregister_method(name)
    from gradspace.trackers import TRACKERS

    if "top-rows" in TRACKERS:
        gradspace.unregister_tracker("top-rows")


def losses(opt, model, n=30):
    out = []
    for x, y in batches(n):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def test_the_preset_line_and_the_tracker_class_train(clean):
    code = blocks()
    preset_line = code[0].strip().rstrip(",")
    name, preset = eval("{" + preset_line + "}").popitem()
    assert name == "galore-reset" and preset == {"tracker": "svd", "moments": "reset"}
    model = nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(256, 256)}), "norm": nn.LayerNorm(256)})
    namespace = {"model": model}
    exec(code[1], namespace)  # registers galore-reset and builds it
    opt = namespace["opt"]
    assert [g.get("rank") for g in opt.param_groups] == [128, None] and opt.param_groups[0]["moments"] == "reset"
    assert opt.param_groups[0]["base"] == "adamw8bit"
    namespace = {}
    exec(code[2], namespace)  # defines TopRows and registers it, and the toprows method
    model = make_model()
    opt = gradspace.create_optimizer("toprows", projected_groups(model, rank=4, gap=5), lr=1e-2)
    curve = losses(opt, model)
    assert curve[-1] < 0.9 * curve[0]  # it trains
    state = opt.state[model.up.weight]
    assert (
        state["tracker"]["tr_moves"] == 5
    )  # moved at steps 6, 11, ... 26 (every update_proj_gap = 5 steps after the first)
    basis = state["basis"]
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]))  # coordinate axes: orthonormal


def test_the_option_line_adds_a_flag_a_default_and_an_identity_key(monkeypatch):
    line = next(b for b in blocks() if b.lstrip().startswith("Option("))
    option = eval(line.strip().rstrip(","), vars(options))
    monkeypatch.setattr(options, "OPTIONS", (*options.OPTIONS, option))
    from gradspace.cli import build_parser
    from gradspace.train.config import FINETUNE

    assert FINETUNE.defaults["label_smoothing"] == 0.0 and "label_smoothing" in FINETUNE.identity
    args = build_parser().parse_args(["finetune", "--label-smoothing", "0.1"])
    assert args.label_smoothing == 0.1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--label-smoothing", "0.1"])  # FINE: not a pretraining option
