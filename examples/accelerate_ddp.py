"""Data-parallel pretraining of a tiny LLaMA with Accelerate and a gradspace optimizer (CPU + gloo works).

    torchrun --nproc_per_node 2 examples/accelerate_ddp.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py   # also on a CPU-only machine
    python examples/accelerate_ddp.py                      # one process

Without CUDA the script asks Accelerate for the CPU, and the processes talk over gloo. (``accelerate launch
--cpu --num_processes 2`` starts one process unless given an MPI hostfile: use one of the commands above.)

DDP averages the gradients before ``optimizer.step()``, and every rank computes the same subspace update from
them (same SVD input, same seeds for the random trackers), so the replicas stay identical; the script checks
that at the end. Layer-wise mode is not for DDP: it steps each weight inside backward, before the average
exists.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from gradspace import create_optimizer
from gradspace.train.data import TokenDataset
from gradspace.train.models import build_llama


class Windows(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self):
        return self.tokens.numel() // self.seq_len

    def __getitem__(self, i):
        return self.tokens[i * self.seq_len : (i + 1) * self.seq_len].long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="galore")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--out", default="runs/accelerate-ddp")
    opts = parser.parse_args()
    torch.set_num_threads(1)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=opts.grad_accum)
    with accelerator.main_process_first():  # the main process tokenises and caches, the others read the cache
        data = TokenDataset.from_corpus("shakespeare", compact=True)
    loader = torch.utils.data.DataLoader(Windows(data.split("train"), 64), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_llama("tiny", vocab_size=data.vocab_size)
    optimizer = create_optimizer(opts.method, model, lr=3e-3, rank=16, update_proj_gap=10, scale=0.25)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # the loader is sharded by rank

    model.train()
    step, batches = 0, iter(loader)
    while step < opts.steps:
        ids = next(batches, None)
        if ids is None:
            batches = iter(loader)
            continue
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()  # Accelerate skips it until the last micro-batch of the window
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            if step % 10 == 0:
                mean = accelerator.reduce(loss.detach(), reduction="mean")
                accelerator.print(f"step {step}: loss {mean.item():.3f}")

    # every replica must hold the same weights: compare a checksum across ranks
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum)
    accelerator.print(f"{accelerator.num_processes} process(es), backend {accelerator.state.backend}, "
                      f"weights identical: {bool((sums == sums[0]).all())}")

    # Accelerate's checkpoint: the optimizer state is saved with torch.save, loaded with weights_only=True
    before = optimizer.state_dict()["state"]
    accelerator.save_state(opts.out)
    accelerator.wait_for_everyone()  # rank 0 writes the files the others read
    accelerator.load_state(opts.out)
    after = optimizer.state_dict()["state"]
    same = all(torch.equal(after[i][k], v) for i, st in before.items() for k, v in st.items()
               if torch.is_tensor(v))
    accelerator.print(f"checkpoint in {opts.out} saved and reloaded, optimizer state unchanged: {same}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
