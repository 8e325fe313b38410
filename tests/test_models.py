"""LLaMA presets: sizes match the papers' names, small ones run a forward pass."""

import math

import pytest
import torch

from gradspace.train.models import PRESETS, build_llama, count_parameters, llama_config


@pytest.mark.parametrize("preset, millions", [("60m", 58), ("130m", 134), ("350m", 368), ("1b", 1339), ("7b", 6738)])
def test_paper_sizes_on_meta(preset, millions):
    # the papers' names count a 32,000-token vocabulary with untied embeddings
    model = build_llama(preset, vocab_size=32000, device="meta")
    assert model.lm_head.weight.is_meta
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.01)
    assert model.config.max_position_embeddings == 1024 and not model.config.tie_word_embeddings


def test_tiny_runs_and_is_small():
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=300)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the vocabulary dominates tiny models
    x = torch.randint(0, 300, (2, 16))
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (2, 16, 300) and out.loss.item() == pytest.approx(math.log(300), rel=0.1)
    assert build_llama("tiny").config.eos_token_id == 50256


def test_overrides_and_unknown_preset():
    assert llama_config("mini", 100, num_hidden_layers=1).num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*" + ", ".join(PRESETS)):
        build_llama("huge")
