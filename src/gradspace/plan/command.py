"""``gradspace plan``: the predicted peak memory of a ``gradspace pretrain`` run, line by line, whether it fits this
machine (or ``--budget``), and the configurations that do, best first, as command lines."""

from __future__ import annotations

import argparse
import os
import sys

from ..sizes import parse_bytes
from .fit import as_json, available, fitting, meta_model, setup_of
from .memory import GiB, plan_memory

#: the options of ``pretrain`` that move its memory: ``gradspace plan`` takes them with the same flags and defaults
PLAN_KEYS = (
    "preset", "model", "dataset", "tokenizer", "full_vocab", "streaming", "method", "base", "rank", "update_gap",
    "memory_budget", "svd", "target_modules", "optim_args", "dtype", "layerwise", "grad_checkpointing", "batch_size",
    "seq_len", "grad_accum", "device", "weight_rounding",
)  # fmt: skip


def add_flags(parser: argparse.ArgumentParser) -> None:
    from ..train.options import BY_KEY

    for key in PLAN_KEYS:
        flags, kwargs = BY_KEY[key].argparse("pretrain")
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--vocab-size", type=int, default=None, help="a preset's vocabulary (default: its corpus's)")
    parser.add_argument("--budget", default=None, help="a memory size (24GiB, 20GB): list what fits it, best first")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    parser.add_argument("--fsdp", action="store_true", help="with --world-size: FSDP2 shards (default DDP)")
    parser.add_argument("--json", action="store_true", help="the plan as JSON, for tools")
    parser.add_argument("--config", default=None, help="a pretrain config file (YAML, TOML or JSON)")


def run(args: argparse.Namespace) -> int:
    from ..train.config import PRETRAIN, explicit_options
    from ..train.errors import UsageError

    explicit = explicit_options(args, PRETRAIN.defaults)
    cfg = {**PRETRAIN.defaults, **explicit}
    PRETRAIN.validate({**cfg, "grad_clip": 0.0})  # clipping moves no memory (and layer-wise needs it off)
    vocab = args.vocab_size
    if vocab is None and not cfg.get("model"):
        from ..train.streams import Data

        vocab = Data(cfg, 1).vocab_size  # the vocabulary the run would train with
    try:
        budget = parse_bytes(args.budget) if args.budget else None
    except ValueError as err:
        raise UsageError(f"--budget: {err}") from None
    model = meta_model(cfg, vocab)
    setup = setup_of(cfg, args.world_size, args.fsdp)
    plan = plan_memory(model, setup)
    have = budget if budget is not None else available(setup.device)
    suggestions = fitting(model, setup, have, "method" in explicit) if budget or plan.peak > have else []
    if args.json:
        print(as_json(plan, have, suggestions, cfg))
        return 0
    name = cfg.get("model") or f"llama-{cfg['preset']}"
    per = f", per process of {args.world_size}" if args.world_size > 1 else ""
    print(f"gradspace plan: {name}, {cfg['method']} ({cfg['base']}), {cfg['dtype']}{per}\n{plan.table()}")
    what = f"--budget {args.budget}" if budget else "available (free memory + this process)"
    verdict = "fits" if plan.peak <= have else "does NOT fit"
    print(f"\n{what}: {have / GiB:.2f} GiB: this run {verdict}")
    if suggestions:
        from .fit import command_line

        print("configurations that fit, best first (highest rank, then the fewest tricks that cost speed):")
        for p in suggestions:
            print(f"  {command_line(p.setup, cfg)}   # {p.peak / GiB:.2f} GiB")
    elif plan.peak > have:
        print("no configuration of this model fits", file=sys.stderr)
    return 0


def check_run(args: argparse.Namespace, command, cfg: dict, loaded, parallel) -> None:
    """Refuse, before training builds its model and optimizer, a run predicted not to fit (rank 0 decides for
    every rank); fine-tuning plans the model it loaded."""
    from ..baselines import BASELINES
    from ..train.config import FINETUNE, explicit_options
    from ..train.errors import UsageError
    from .fit import check_before_training

    if cfg["method"] in BASELINES and cfg["method"] != "adamw8bit":
        if parallel.main:
            print(f"gradspace: memory not checked: the plan does not model method {cfg['method']} yet", file=sys.stderr)
        return
    error = None
    if parallel.main:
        given = "method" in explicit_options(args, command.defaults)
        model = getattr(loaded, "model", None) if command is FINETUNE else None
        vocab = None if model is not None else loaded.vocab_size
        if model is not None and not cfg.get("target_modules"):
            cfg = {**cfg, "target_modules": loaded.targets}  # the encoder's own linears
        try:
            check_before_training(cfg, vocab, world=parallel.world, fsdp=args.fsdp, method_fixed=given, model=model)
        except UsageError as err:
            error = err
        except Exception as err:  # a model the planner cannot probe trains unchecked, and says so
            print(f"gradspace: warning: memory not checked ({type(err).__name__}: {err})", file=sys.stderr)
    parallel.agree(error)
