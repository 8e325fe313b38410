"""Will it fit: a run's configuration turned into a memory plan, the memory this machine has, the configurations
that fit a budget (best first), and the check every training command makes before it builds its model.

The order of the search, for a fixed method: the highest rank (up to the paper's d/4), then the fewest of the
tricks that cost speed or precision, cheapest first: layer-wise updates, a bfloat16 basis, the 8-bit inner rule,
gradient checkpointing, bfloat16 weights (updated with round-to-nearest), then a smaller micro-batch with
accumulation to keep the global batch. Without a fixed method the
methods are tried in the order GaLore, APOLLO-Mini (its own rank 1), full-rank AdamW.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from itertools import product
from pathlib import Path
from typing import Any

from ..train.precision import WEIGHT_DTYPES
from .memory import GiB, Plan, Setup, plan_memory


def setup_of(cfg: dict[str, Any], world: int = 1, fsdp: bool = False) -> Setup:
    """The memory-relevant part of a ``pretrain`` configuration."""
    from ..methods import METHODS
    from ..train.config import parse_optim_args
    from ..train.errors import UsageError

    method, base = cfg["method"], cfg["base"]
    if method == "adamw8bit":  # the baseline is full-rank AdamW with the 8-bit rule
        method, base = "adamw", "adamw8bit"
    if method not in METHODS:
        raise UsageError(f"the memory plan does not model method {method} yet (adapters, factors or blocks)")
    return Setup(
        method=method,
        base=base,
        rank=cfg.get("rank"),
        update_gap=cfg.get("update_gap") or 200,
        dtype=cfg["dtype"],
        layerwise=cfg["layerwise"],
        grad_checkpointing=cfg["grad_checkpointing"],
        batch_size=cfg["batch_size"],
        seq_len=cfg.get("seq_len") or cfg["max_length"],  # fine-tuning: the examples' length
        grad_accum=cfg["grad_accum"],
        svd=cfg.get("svd"),
        device=cfg["device"],
        world=world,
        fsdp=fsdp,
        target_modules=cfg.get("target_modules"),
        optim_args=parse_optim_args(cfg.get("optim_args")),
        weight_rounding=cfg.get("weight_rounding", "auto"),
    )


def meta_model(cfg: dict[str, Any], vocab_size: int | None = None):
    """The run's model on the meta device (nothing allocated): the preset's LLaMA, or ``--model``'s config."""
    import torch

    if cfg.get("model"):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(Path(str(cfg["model"])).expanduser(), local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    from ..train.models import build_llama

    return build_llama(cfg["preset"], vocab_size=vocab_size or 50257, device="meta")


def available(device: str = "cpu") -> int:
    """Memory this process may still reach: the free memory plus what it already holds (the plan's baseline)."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free + torch.cuda.memory_allocated(torch.device(device))
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    with open("/proc/self/statm") as f:
        return free + int(f.read().split()[1]) * 4096


def candidates(s: Setup, hidden: int, method_fixed: bool) -> list[tuple[tuple, Setup]]:
    """Every configuration of the search, with its sort key (see the module docstring)."""
    from ..methods import METHODS

    methods = [s.method] if method_fixed else ["galore", "apollo-mini", "adamw"]
    top = s.rank or hidden // 4
    ranks = sorted({max(1, top // d) for d in (1, 2, 4, 8)}, reverse=True)
    global_batch = s.batch_size * s.grad_accum
    micro = sorted({b for b in (global_batch, global_batch // 2, global_batch // 4, 1) if b >= 1}, reverse=True)
    out = []
    for m_index, method in enumerate(methods):
        projected = METHODS[method] is not None
        lower = WEIGHT_DTYPES[WEIGHT_DTYPES.index(s.dtype) :]  # the run's weight dtype, then the smaller ones
        for rank, layerwise, bf16_basis, eight_bit, ckpt, smaller, batch in product(
            ranks if projected else [None],
            (False, True),
            (False, True) if projected else (False,),
            (False, True),
            (False, True),
            range(len(lower)),
            micro,
        ):
            if global_batch % batch:
                continue
            args = {**s.optim_args}
            if bf16_basis:
                args["basis_dtype"] = "bfloat16"
            setup = replace(
                s,
                method=method,
                rank=rank,
                layerwise=layerwise,
                base="adamw8bit" if eight_bit else s.base,
                grad_checkpointing=ckpt or s.grad_checkpointing,
                dtype=lower[smaller],
                batch_size=batch,
                grad_accum=global_batch // batch,
                optim_args=args,
            )
            tricks = (layerwise, bf16_basis, eight_bit, ckpt, smaller, global_batch // batch)
            out.append(((m_index, -(rank or 0), sum(map(bool, tricks)), tricks), setup))
    out.sort(key=lambda x: x[0])
    return out


def fitting(model, s: Setup, budget: int, method_fixed: bool, limit: int = 5) -> list[Plan]:
    """The best ``limit`` configurations whose predicted peak is within ``budget``."""
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
    found: list[Plan] = []
    for _, setup in candidates(s, hidden, method_fixed):
        if plan_memory(model, setup, probe=False).peak > budget:
            continue
        plan = plan_memory(model, setup)
        if plan.peak <= budget:
            found.append(plan)
            if len(found) == limit:
                break
    return found


def command_line(s: Setup, cfg: dict[str, Any]) -> str:
    """The ``gradspace pretrain`` flags of a setup (beside the run's other flags)."""
    if "task" in cfg:
        where = f"finetune --task {cfg['task']} --model {cfg['model']}"
    else:
        where = f"pretrain --model {cfg['model']}" if cfg.get("model") else f"pretrain --preset {cfg['preset']}"
    parts = [f"gradspace {where} --method {s.method}"]
    if s.base != "adamw":
        parts.append(f"--base {s.base}")
    if s.rank and s.method != "apollo-mini":
        parts.append(f"--rank {s.rank}")
    if s.dtype != "float32":
        parts.append(f"--dtype {s.dtype}")
    if s.layerwise:
        parts.append("--layerwise --grad-clip 0")
    if s.grad_checkpointing:
        parts.append("--grad-checkpointing")
    parts.append(f"--batch-size {s.batch_size}" + (f" --grad-accum {s.grad_accum}" if s.grad_accum > 1 else ""))
    if s.optim_args:
        parts.append("--optim-args " + ",".join(f"{k}={v}" for k, v in s.optim_args.items()))
    return " ".join(parts)


def refusal(plan: Plan, have: int, suggestions: list[Plan], cfg: dict[str, Any]) -> str:
    """The one-paragraph error of a run predicted not to fit."""
    at_least = "at least " if plan.line("baseline") == 0 else ""
    text = (
        f"this run is predicted to need {at_least}{plan.peak / GiB:.1f} GiB at its peak ({_split(plan)}), but "
        f"{have / GiB:.1f} GiB are available"
    )
    if suggestions:
        lines = "\n".join(f"  {command_line(p.setup, cfg)}   # {p.peak / GiB:.1f} GiB" for p in suggestions)
        return f"{text}; these fit:\n{lines}\n(or pass --no-memory-check to run it anyway)"
    return f"{text}, and no configuration of this model fits (pass --no-memory-check to run it anyway)"


def _split(plan: Plan) -> str:
    big = sorted(plan.lines, key=lambda x: -x.bytes)[:4]
    return ", ".join(f"{x.part} {x.bytes / GiB:.1f}" for x in big)


def check_before_training(
    cfg: dict[str, Any],
    vocab_size: int | None,
    *,
    world: int = 1,
    fsdp: bool = False,
    method_fixed: bool = True,
    model=None,
) -> None:
    """Refuse (a UsageError: exit 2) a run predicted not to fit this machine, naming configurations that do.
    ``model``: the model already loaded (fine-tuning), planned through a meta-device copy of its architecture."""
    import torch

    from ..train.errors import UsageError

    if model is not None:
        with torch.device("meta"):
            model = type(model)(model.config)
    else:
        model = meta_model(cfg, vocab_size)
    setup = setup_of(cfg, world, fsdp)
    have = available(setup.device)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if setup.device == "cpu" else 1
    lower = plan_memory(model, setup, probe=False)  # weights, gradients and state alone: no activations probe
    if (lower.peak + _activations_bound(model.config, setup)) * here <= have * 0.5:
        return  # far from the limit whatever the activations: no probe needed
    plan = lower if lower.peak * here > have else plan_memory(model, setup)
    if plan.peak * here <= have:  # torchrun's processes on this host share its memory
        return
    if here > 1:
        have //= here
    raise UsageError(refusal(plan, have, fitting(model, setup, have, method_fixed, 3), cfg))


def _activations_bound(config, s: Setup) -> int:
    """A generous upper bound of what activations and the loss can take (3x the probe's figure for LLaMA-1B):
    per token, each layer 40 hidden + 8 intermediate + 2 x heads x sequence values, and 4 vocabulary-sized ones."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    layers = next(getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k))
    per_token = layers * (40 * hidden + 8 * inner + 2 * heads * s.seq_len) + 4 * config.vocab_size
    return s.batch_size * s.seq_len * per_token * 4


def as_json(plan: Plan, have: int, suggestions: list[Plan], cfg: dict[str, Any]) -> str:
    out = {**plan.as_dict(), "available_bytes": have, "fits": plan.peak <= have}
    out["fitting"] = [{**p.as_dict(), "command": command_line(p.setup, cfg)} for p in suggestions]
    return json.dumps(out, indent=1)
