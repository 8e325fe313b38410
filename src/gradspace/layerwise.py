"""Layer-wise mode: each weight is stepped inside backward, as soon as its gradient is complete, and its gradient
is freed at once, so the full set of gradients is never held.

    opt = create_optimizer("galore", model, lr=1e-3, rank=128)
    layerwise = Layerwise(opt, accumulation_steps=4)
    for i, batch in enumerate(loader):
        (model(**batch).loss / 4).backward()   # every 4th backward also updates the weights
    layerwise.remove()

Gradient accumulation is supported (galore-torch's and the Hugging Face Trainer's layer-wise modes refuse it):
each parameter counts its own backward passes and steps on every ``accumulation_steps``-th one. Between steps,
a projected weight whose tracker only needs the gradient at update steps (``svd``, ``grasswalk``, ``grassjump``;
not with recovery scaling) accumulates ``S^T G`` (r x l) instead of ``G`` (m x n) when its basis is not due to move
at the coming step; otherwise the full gradient accumulates in ``p.grad`` as usual.

Differences from the normal mode, by necessity: a non-finite gradient is caught per parameter, so with
``nonfinite="error"`` weights earlier in backward may already have moved when it is raised; ``nonfinite="skip"``
skips the affected parameter's step only. A parameter that receives no gradient in a backward pass does not count
that pass. Save checkpoints at accumulation boundaries (a partial window's buffers are not in the state dict).

**Data-parallel** (``process_group``, e.g. ``torch.distributed.group.WORLD`` under torchrun, with the model *not*
wrapped in DDP): at the last backward of a window each gradient is averaged over the ranks by its own all-reduce,
then stepped and freed, so no rank ever holds the whole gradient set (DDP's buckets are a second copy of it, which
is why this does not go through DDP). Micro-batches before the last reduce nothing, as under DDP's ``no_sync``.
Every rank must give every parameter a gradient in every backward pass (as DDP requires by default), and the
model must start equal on every rank: :func:`gradspace.distributed.replicate` broadcasts rank 0's.

**FSDP2** (the model wrapped by ``fully_shard``, no ``process_group``): FSDP2 reduce-scatters each block's
gradients when the block's backward is done and then calls the sharded parameters' post-accumulate-grad hooks
(on its reduce stream, so a CUDA step reads a finished gradient), so each weight steps on its shard and frees its
sharded gradient then; the root's own parameters (embeddings, head) step when FSDP2 reduces them at the end of
backward. Between windows FSDP2 accumulates the sharded gradients in full (no projected accumulation).

A training loop that decides the windows itself (the Hugging Face Trainer shortens an epoch's last window)
passes ``sync``, a callable that is true during the last backward of a window, instead of counting:
``Layerwise(opt, sync=lambda: accelerator.sync_gradients)``. The optimizer's own ``step()`` then finds no
gradient left and does nothing, so such a loop may keep calling it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .distributed import is_dtensor
from .optimizer import SubspaceOptimizer


class Layerwise:
    def __init__(
        self,
        optimizer: SubspaceOptimizer,
        accumulation_steps: int = 1,
        *,
        sync: Callable[[], bool] | None = None,
        process_group=None,
    ):
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if not isinstance(optimizer, SubspaceOptimizer):
            raise TypeError("layer-wise mode needs a gradspace SubspaceOptimizer")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.sync = sync
        self.group = process_group
        self.world = 1 if process_group is None else torch.distributed.get_world_size(process_group)
        self._count: dict[torch.Tensor, int] = {}  # backward passes so far in the parameter's current window
        self._projected: dict[torch.Tensor, torch.Tensor] = {}
        # indices, not group dicts: load_state_dict replaces the dicts, and LR schedulers write the new ones
        self._group_index = {p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        params = [p for p in self._group_index if p.requires_grad]
        if any(is_dtensor(p) for p in params):
            _check_fsdp2(process_group)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def remove(self) -> None:
        """Detach the hooks: back to the normal mode (``optimizer.step()``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _group(self, p: torch.Tensor) -> dict:
        return self.optimizer.param_groups[self._group_index[p]]

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        count = self._count.get(p, 0) + 1
        boundary = self.sync() if self.sync is not None else count == self.accumulation_steps
        acc = self._projected.get(p)
        if boundary:
            self._count[p] = 0
            self._projected.pop(p, None)
            if self.world > 1:  # the same parameters in the same order on every rank: autograd's order
                for t in (p.grad, acc) if acc is not None else (p.grad,):
                    torch.distributed.all_reduce(t, group=self.group)
                    t.div_(self.world)
            self.optimizer.step_param(p, acc, self._group(p))
            p.grad = None
            return
        self._count[p] = count
        if acc is None and count > 1:
            return  # this window accumulates in full (decided at its first micro-batch)
        gt = self.optimizer.projected_gradient(p, self._group(p))
        if gt is None:
            return
        self._projected[p] = gt if acc is None else acc.add_(gt)
        p.grad = None


def _check_fsdp2(process_group) -> None:
    """FSDP2 reduces the gradients itself, and must call the sharded parameters' post-accumulate-grad hooks after
    its reduce-scatter (the torch 2.13 FSDP2 does; an FSDP2 that does not would leave every step to ``step()``)."""
    import inspect

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    if process_group is not None:
        raise ValueError("the parameters are FSDP2 DTensors: FSDP2 reduces their gradients, do not pass process_group")
    if "_post_accumulate_grad_hooks" not in inspect.getsource(_fsdp_collectives.foreach_reduce):
        raise ValueError(
            f"layer-wise mode under FSDP2 needs an FSDP2 that calls post-accumulate-grad hooks after its "
            f"reduce-scatter, which torch {torch.__version__} does not: upgrade torch, or use DDP"
        )
