"""Parameter selection and the one-line entry point, on a real (tiny) LLaMA."""

import re

import pytest
import torch
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
