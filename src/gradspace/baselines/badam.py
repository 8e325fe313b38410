"""BAdam (Luo et al. 2024): block coordinate descent, through the ``badam`` package's ``BlockOptimizer`` (its
LICENSE file is Apache-2.0; its package metadata says MIT). One block of parameters (a transformer layer) trains at
a time, with Adam on a float32 copy of that block alone; every ``switch_block_every`` steps the next block takes
over and the Adam state starts afresh. The optimizer state is one block's, a model's depth fewer bytes than AdamW's.

Options (the package's names): ``switch_block_every`` (50), ``switch_mode`` (``ascending``, ``descending``,
``random``, ``fixed``; default ``ascending``, LLaMA-Factory's), ``include_embedding`` and ``include_lm_head``
(blocks of their own; default on in pretraining, where a never-trained embedding would stay random, off in
fine-tuning as in the package). A fine-tuned task head trains at every step (``active_modules``). The inner rule
is the package's ``torch.optim.AdamW`` (``betas``, ``eps`` as optim-args); ``--base`` does not apply.

What the package does not keep, this wrapper adds so a run resumes exactly: the block order and position, the
step counter and the block's float32 copy are part of ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from typing import Any

import torch
from torch import nn

from .base import Baseline

HEADS = ("classifier", "pooler", "score")


class BAdam(Baseline):
    name = "badam"
    defaults = {
        "switch_block_every": 50,
        "switch_mode": "ascending",
        "include_embedding": None,
        "include_lm_head": None,
    }

    def check(self, own: dict[str, Any], steps: int) -> None:
        mode, every = own["switch_mode"], own["switch_block_every"]
        if mode not in ("ascending", "descending", "random", "fixed"):
            raise ValueError(f"badam switch_mode must be ascending, descending, random or fixed, got {mode!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"badam switch_block_every must be a positive integer, got {every!r}")

    def trainable(self, model: nn.Module, optimizer) -> int:
        """Every parameter of its blocks and active modules (one block trains at a time)."""
        return _trainable(model, optimizer)

    def optimizer(self, model: nn.Module, lr: float, base: str, rule: dict, own: dict, pretraining: bool, **kw):
        if base != "adamw":
            raise ValueError(f"badam steps each block with the package's AdamW; --base {base} does not apply")
        unknown = sorted(set(rule) - {"betas", "eps"})
        if unknown:
            raise ValueError(f"badam takes betas and eps for its AdamW, not {', '.join(unknown)}")
        self.check(own, 1)
        include = {k: own[k] if own[k] is not None else pretraining for k in ("include_embedding", "include_lm_head")}
        names = [n for n, _ in model.named_parameters()]
        heads = [] if pretraining else [f"{h}." for h in HEADS if any(f"{h}." in n for n in names)]
        inner = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=kw.get("weight_decay", 0.0), **{"betas": (0.9, 0.999), **rule}
        )
        return block_coordinate()(
            inner,
            list(model.named_parameters()),
            block_prefix_list=blocks(model, heads, **include),
            switch_block_every=own["switch_block_every"],
            switch_mode=own["switch_mode"],
            active_modules=heads,
            verbose=0,
        )


def blocks(model: nn.Module, heads: list[str], include_embedding: bool, include_lm_head: bool) -> list[list[str]]:
    """The package's blocks, found from the model's structure: one per layer of its stack of layers (its largest
    ``nn.ModuleList``), its embeddings as one and the rest (final norm, LM head) as one. The package infers them from
    names matching ``layers.N.``, which a BERT (``encoder.layer.N.``) does not have: it then finds no block."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError("badam needs a model with a stack of layers (an nn.ModuleList) to make its blocks of")
    stack, layers = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    per_layer = [[f"{stack}.{i}."] for i in range(len(layers))]
    embeddings = [f"{n}." for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    taken = [p for block in per_layer for p in block] + embeddings + heads
    rest = [n for n, _ in model.named_parameters() if not any(p in n for p in taken)]
    return (
        ([embeddings] if include_embedding and embeddings else [])
        + per_layer
        + ([rest] if include_lm_head and rest else [])
    )


def _quiet():
    """The package prints every block switch to stdout and warns about float32 weights; the run says less."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _trainable(model: nn.Module, optimizer) -> int:
    prefixes = [p for block in optimizer.block_prefix_list for p in block] + list(optimizer.active_modules)
    return sum(p.numel() for n, p in model.named_parameters() if any(x in n for x in prefixes))


@functools.cache
def block_coordinate() -> type:
    """The optimizer class, built on first use: importing ``badam`` imports ``transformers.Trainer`` (seconds and
    tens of MB), which a run of another method must not pay."""
    from badam import BlockOptimizer

    class BlockCoordinate(BlockOptimizer):
        """``badam.BlockOptimizer`` with what a run needs of an optimizer here: a complete ``state_dict`` (resume) and
        ``diagnostics()`` (the summary's state bytes)."""

        skipped_steps = 0

        def __init__(self, *args, **kwargs):
            with _quiet():
                super().__init__(*args, **kwargs)
            self.__dict__.pop("state_dict", None)  # the package points state_dict at the inner AdamW's: ours is whole

        def step(self, *args, **kwargs):
            """The package's single-device step, switching after every ``switch_block_every``-th step: the package
            tests its counter after incrementing it, so its first block trains one step less than the others."""
            with _quiet():
                self.step_single_gpu(*args, **kwargs)
                if self.global_step % self.switch_block_every == 0:
                    self.switch_trainable_params()

        def state_dict(self) -> dict[str, Any]:
            return {
                "inner": self.base_optimizer.state_dict(),
                "block": {
                    "global_step": self.global_step,
                    "current_block_idx": self.current_block_idx,
                    "active": list(self.active_param_prefixs),
                    "order": list(getattr(self, "block_order", [])),
                },
                "copies": [p.detach().clone() for p in self.param_idx2hp.values()],
            }

        def load_state_dict(self, state: dict[str, Any]) -> None:
            block = state["block"]
            self.active_param_prefixs = list(block["active"])
            with _quiet():
                self._switch_trainable_params_single_gpu(0)
            copies = list(self.param_idx2hp.values())
            if len(copies) != len(state["copies"]):
                raise ValueError("badam checkpoint: its active block does not match this model's parameters")
            with torch.no_grad():
                for p, saved in zip(copies, state["copies"]):
                    p.copy_(saved)
            self.base_optimizer.state = type(self.base_optimizer.state)()
            self.base_optimizer.load_state_dict(state["inner"])
            self.global_step, self.current_block_idx = block["global_step"], block["current_block_idx"]
            if self.switch_mode == "random":
                self.block_order = list(block["order"])

        def diagnostics(self) -> dict[str, Any]:
            """The inner AdamW's moments and the active block's float32 copy, in bytes."""
            tensors = [v for s in self.base_optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            tensors += list(self.param_idx2hp.values())
            return {
                "weights": {},
                "skipped_steps": 0,
                "state_bytes": sum(t.numel() * t.element_size() for t in tensors),
                "update_seconds": 0.0,
            }

    return BlockCoordinate
