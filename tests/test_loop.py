"""The training loop: learns, reports data per step, and resumes bit-exactly from saved states."""

import math

import numpy as np
import pytest
import torch
from transformers import get_scheduler

from gradspace.train.data import BatchStream, TokenDataset
from gradspace.train.loop import evaluate, train
from gradspace.train.models import build_llama

VOCAB = 32


def setup(steps=20, seed=0):
    torch.manual_seed(seed)
    model = build_llama("tiny", vocab_size=VOCAB, num_hidden_layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = TokenDataset(np.tile(np.random.default_rng(0).integers(0, VOCAB, 50), 40))  # a 50-token phrase repeated
    return (
        model,
        optimizer,
        get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=max(1, steps // 10),
            num_training_steps=steps,
            scheduler_specific_kwargs={"min_lr_rate": 0.1},
        ),
        BatchStream(data, batch_size=4, seq_len=32),
        data,
    )


def test_train_learns_and_reports():
    model, opt, sched, stream, data = setup(30)
    batches = data.fixed_batches("val", 2, 4, 32)
    before = evaluate(model, batches)["val_loss"]
    seen = []
    evals = []

    def every_10(step):
        if step % 10 == 0:
            evals.append({"step": step, **evaluate(model, batches)})

    out = train(model, opt, stream, 30, scheduler=sched, callback=seen.append, log_every=10, step_hook=every_10)
    assert [r["step"] for r in seen] == [10, 20, 30] and len(out["history"]) == 30
    assert [e["step"] for e in evals] == [10, 20, 30] and out["stopped_at"] is None
    last = evals[-1]
    assert last["val_loss"] < before - 1.0 and last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    assert out["tokens"] == 30 * 4 * 32 and model.training
    with pytest.raises(ValueError, match="steps"):
        train(model, opt, stream, 0)


def test_resume_is_exact():
    model, opt, sched, stream, _ = setup()
    straight = [r["loss"] for r in train(model, opt, stream, 20, scheduler=sched)["history"]]

    model, opt, sched, stream, _ = setup()
    first = [r["loss"] for r in train(model, opt, stream, 10, scheduler=sched)["history"]]
    saved = {k: x.state_dict() for k, x in {"model": model, "opt": opt, "sched": sched, "stream": stream}.items()}
    model, opt, sched, stream, _ = setup(seed=1)
    for k, x in {"model": model, "opt": opt, "sched": sched, "stream": stream}.items():
        x.load_state_dict(saved[k])
    second = [r["loss"] for r in train(model, opt, stream, 10, scheduler=sched)["history"]]
    assert first + second == straight
