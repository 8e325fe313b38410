"""Parameter selection and the one-line entry point, on a real (tiny) LLaMA."""

import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from gradspace import SubspaceOptimizer, create_optimizer, select_params


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def names(group):
    return set(group["param_names"])


def test_default_targets_are_attention_and_mlp_linears(llama):
    groups = select_params(llama, rank=8)
    proj = names(groups[0])
    assert len(proj) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(("self_attn" in n or "mlp" in n) and n.endswith(".weight") for n in proj)
    assert groups[0]["rank"] == 8
    rest = names(groups[1])
    assert "model.embed_tokens.weight" in rest and "model.norm.weight" in rest
    assert len(proj) + len(rest) == len(list(llama.parameters()))


def test_all_linear_excludes_head_unless_named(llama):
    proj = names(select_params(llama, "all-linear")[0])
    assert "lm_head.weight" not in proj and len(proj) == 14
    proj = names(select_params(llama, ["all-linear", "lm_head"])[0])
    assert "lm_head.weight" in proj


def test_regex_and_list_targets(llama):
    proj = names(select_params(llama, re.compile(r"layers\.0\..*(q|k)_proj"))[0])
    assert proj == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"}
    proj = names(select_params(llama, [r"model\.layers\.1\.mlp\.down_proj"])[0])
    assert proj == {"model.layers.1.mlp.down_proj.weight"}


def test_bad_targets_raise(llama):
    with pytest.raises(ValueError, match="matched no"):
        select_params(llama, ["nothing_like_this"])
    with pytest.raises(ValueError, match="only 2-D"):
        select_params(llama, ["input_layernorm"])


def test_create_optimizer_on_a_model_trains_and_names_params(llama):
    opt = create_optimizer("galore", llama, lr=1e-3, rank=4, update_proj_gap=2, weight_decay=0.01)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = llama(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    diag = opt.diagnostics()["weights"]
    assert "model.layers.0.self_attn.q_proj.weight" in diag
    assert diag["model.layers.0.mlp.up_proj.weight"]["rank"] == 4


def test_hugging_face_style_groups_work_unchanged(llama):
    # what transformers' Trainer builds for optim="galore_adamw": a galore group and a plain group
    galore_params = [p for n, p in llama.named_parameters() if "mlp" in n]
    ids = {id(p) for p in galore_params}
    others = [p for p in llama.parameters() if id(p) not in ids]
    groups = [
        {"params": others},
        {"params": galore_params, "rank": 4, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std"},
    ]
    opt = SubspaceOptimizer(groups, lr=1e-3, weight_decay=0.0)
    assert opt.param_groups[1]["rank"] == 4 and "rank" not in opt.param_groups[0]
    opt2 = create_optimizer("galore", groups, lr=1e-3)
    assert opt2.param_groups[1]["update_proj_gap"] == 50


def test_full_rank_method_rejects_projection_options(llama):
    with pytest.raises(ValueError, match="full rank"):
        create_optimizer("adamw", llama, rank=4)
    opt = create_optimizer("adamw", llama, lr=1e-3)
    assert all("rank" not in g for g in opt.param_groups)


# ------------------------------------------------------------------------------------ transformers' Conv1D (GPT-2)
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))


def test_gpt2_conv1d_weights_are_selected_by_all_linear_substrings_and_regexes():
    gpt2 = tiny_gpt2()
    (proj, _rest) = select_params(gpt2, "all-linear")
    assert proj["transposed"] and sorted({n.split(".")[-2] for n in proj["param_names"]}) == [
        "c_attn",
        "c_fc",
        "c_proj",
    ]
    assert len(proj["param_names"]) == 2 * 4 and not any("lm_head" in n or "wte" in n for n in proj["param_names"])
    assert names(select_params(gpt2, "attn")[0]) == {
        f"transformer.h.{i}.attn.{m}.weight" for i in (0, 1) for m in ("c_attn", "c_proj")
    }
    assert names(select_params(gpt2, re.compile(r"h\.1\.mlp\.c_fc"))[0]) == {"transformer.h.1.mlp.c_fc.weight"}
    with pytest.raises(ValueError, match="c_attn, c_fc, c_proj"):
        select_params(gpt2, ["q_proj", "v_proj"])  # LLaMA's names on a GPT-2: the error says what exists


class Pair(nn.Module):
    """The same three layers as nn.Linear (out, in) or as transformers' Conv1D (in, out, stored transposed)."""

    def __init__(self, conv: bool):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        shapes = [(24, 40), (40, 40), (40, 8)]  # in -> out: wide, square, narrow
        lins = [nn.Linear(i, o) for i, o in shapes]
        if conv:
            convs = []
            for lin, (i, o) in zip(lins, shapes):
                c = Conv1D(o, i)
                c.weight.data.copy_(lin.weight.data.T)
                c.bias.data.copy_(lin.bias.data)
                convs.append(c)
            lins = convs
        self.layers = nn.ModuleList(lins)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("proj_type", ["std", "left", "right", "reverse_std"])
def test_conv1d_weights_train_exactly_as_their_linear_transposes(proj_type):
    from gradspace import create_optimizer

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 24, generator=g), torch.randn(16, 8, generator=g)) for _ in range(12)]
    runs = []
    for conv in (False, True):
        model = Pair(conv)
        opt = create_optimizer(
            "galore", model, lr=1e-2, rank=4, update_proj_gap=5, proj_type=proj_type, target_modules="all-linear"
        )
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        runs.append(model)
    for lin, conv in zip(runs[0].layers, runs[1].layers):
        torch.testing.assert_close(conv.weight.T, lin.weight, rtol=1e-5, atol=1e-6)
    moved = [float((a.weight - b.weight).abs().max().detach()) for a, b in zip(runs[0].layers, Pair(False).layers)]
    assert min(moved) > 1e-3  # every layer trained
