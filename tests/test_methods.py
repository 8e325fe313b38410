"""Every method with every inner rule trains a tiny LLaMA on real text (Shakespeare, characters) and resumes
bit-identically from a weights_only checkpoint."""

import io

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradspace import METHODS, create_optimizer
from gradspace.rules import RULES
from gradspace.train.assets import shakespeare_text

SUBSPACE_METHODS = [m for m in METHODS if m != "adamw"]
LR = {"adamw": 3e-3, "adamw8bit": 3e-3, "lion": 3e-4, "adafactor": 3e-3, "sgd": 0.3}


@pytest.fixture(scope="module")
def text_ids():
    text = shakespeare_text()[:200_000]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    return torch.tensor([vocab[c] for c in text]), len(vocab)


def tiny_llama(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def batches(ids, n, seed=0, batch=8, seq=32):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq, (n, batch), generator=g)
    return [torch.stack([ids[s : s + seq] for s in row]) for row in starts]


def make(method, base, model, gap=20):
    kwargs = {} if method == "adamw" else {"rank": 8, "update_proj_gap": gap}
    return create_optimizer(method, model, lr=LR[base], base=base, weight_decay=0.01, **kwargs)


def run(model, opt, data):
    losses = []
    for x in data:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(RULES))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_and_rule_learns(method, base, text_ids):
    ids, vocab = text_ids
    model = tiny_llama(vocab)
    losses = run(model, make(method, base, model), batches(ids, 200))
    start, end = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert end < 0.85 * start, f"{method}/{base}: loss {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("base", sorted(RULES))
@pytest.mark.parametrize("method", SUBSPACE_METHODS)
def test_every_method_and_rule_resumes_bit_identically(method, base, text_ids):
    ids, vocab = text_ids
    data = batches(ids, 30, seed=1)
    model = tiny_llama(vocab)
    run(model, make(method, base, model, gap=10), data)
    expected = [p.detach().clone() for p in model.parameters()]

    model = tiny_llama(vocab)
    opt = make(method, base, model, gap=10)
    run(model, opt, data[:17])  # between subspace updates (every 10 steps)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_llama(vocab, seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(method, base, resumed, gap=10)
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, data[17:])
    for a, b in zip(resumed.parameters(), expected):
        assert torch.equal(a, b)
