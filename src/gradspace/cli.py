"""The ``gradspace`` command line: pretrain, fine-tune (a task head, or a causal LM on instructions), compare.

gradspace pretrain --preset tiny --method galore --steps 200 --out runs/tiny-galore
gradspace pretrain --resume runs/tiny-galore          # continues from the newest checkpoint, bit-exactly
gradspace finetune --task rotten-tomatoes --method galore --steps 300 --out runs/rt-galore
gradspace finetune --model smollm2 --task synth-instruct --method galore   # a causal LM on instructions (SFT)
gradspace compare --methods adamw,galore,subtrack --steps 150 --out runs/compare   # --task: fine-tuning
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

from .train import options, runfolder
from .train.compare import parse_methods, run_compare
from .train.config import (
    COMPARE_OPTIONS,
    DEFAULT_COMPARE,
    FINETUNE,
    PRETRAIN,
    UsageError,
    explicit_options,
    read_config_file,
)
from .train.export import SAMPLE
from .train.harness import FLAGS as EVAL_FLAGS
from .train.parallel import Parallel
from .train.rebuild import EXPORT_FLAGS
from .train.recipes import finetune_setup, run_finetune, run_pretrain
from .train.runfolder import RunLock, resolve_run, target
from .train.streams import Data
from .train.summary import RunDiverged

# ---------------------------------------------------------------------------------------------- arguments
#: the flags of a run that are not options of its configuration (each option's flag is in gradspace.train.options)
RUN_FLAGS = [
    (["--out"], {"default": None, "help": "run folder (default runs/<name>-<timestamp>)"}),
    (["--overwrite"], {"action": "store_true", "help": "replace the run that --out already holds"}),
    (["--config"], {"default": None, "help": "YAML, TOML or JSON file with the same keys; flags override it"}),
    (["--stop-after"], {"type": int, "default": None, "help": argparse.SUPPRESS}),  # tests: Ctrl-C after step N
]
MEMORY_CHECK = (["--no-memory-check"], {"action": "store_true", "help": "run even if predicted not to fit"})
RESUME = (
    ["--resume"],
    {"default": None, "help": "a checkpoint file, or a run folder (its newest readable checkpoint)"},
)
PARALLEL = [
    (["--fsdp"], {"action": "store_true", "help": "under torchrun: shard the model with FSDP2 (default DDP)"}),
    (["--shard-updates"], {"action": "store_true", "help": "under torchrun: each subspace update on one rank"}),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradspace", description="Train language models in a low-rank gradient subspace (GaLore and successors)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    commands = {
        "pretrain": (
            "pretrain a LLaMA preset, or your own causal LM (--model), on a corpus",
            [RESUME, MEMORY_CHECK, *PARALLEL],
        ),
        "finetune": (
            "fine-tune a pretrained model on a classification or regression task, or a causal LM on instructions",
            [RESUME, MEMORY_CHECK, *PARALLEL],
        ),
        "compare": (
            "run several methods on identical data, seed and budget; write a report (fine-tuning with --task)",
            [],
        ),
        "plan": ("predict a pretrain run's peak memory, and what fits this machine or --budget", []),
        "sample": ("print what a run's causal LM writes after a prompt (an instruction-tuned one: its answer)", SAMPLE),
        "eval": ("run lm-evaluation-harness tasks on a run's causal LM (offline with local task files)", EVAL_FLAGS),
        "export": (
            "write a run's model folder (RUN/model) from its newest good checkpoint, without training",
            EXPORT_FLAGS,
        ),
    }
    for name, (help_, flags) in commands.items():
        sp = sub.add_parser(name, help=help_)
        if name in ("pretrain", "finetune", "compare"):
            options.add_flags(sp, name)
            flags = [*flags, *RUN_FLAGS]
        if name == "plan":
            from .plan.command import add_flags

            add_flags(sp)
        for names, kwargs in flags:
            sp.add_argument(*names, **kwargs)
    return p


def _pretrain_done(s: dict, out: Path) -> str:
    return (
        f"done: {s['steps']} steps, final train loss {s['final_loss']:.4f}, val loss {s['val_loss']:.4f} "
        f"(ppl {s['val_ppl']:.2f}), {s['wall_time']:.1f}s; metrics in {out / 'metrics.jsonl'}"
    )


def _finetune_done(s: dict, out: Path) -> str:
    return (
        f"done: {s['steps']} steps, final train loss {s['final_loss']:.4f}, validation {s['metric']} "
        f"{s[s['metric']]:.4f} (loss {s['val_loss']:.4f}), {s['wall_time']:.1f}s; results in {out / 'summary.json'}"
    )


#: command -> (Command, default folder name, what is loaded once, what is trained, the last line)
TRAINING = {
    "pretrain": (
        PRETRAIN,
        lambda c: f"{c['preset']}-{c['method']}",
        lambda c, world: Data(c, world),
        lambda c: c.get("model") or "llama-" + c["preset"],
        lambda c, out, data, **run: run_pretrain(c, out, data=data, **run),
        _pretrain_done,
    ),
    "finetune": (
        FINETUNE,
        lambda c: f"{Path(str(c['task'])).stem.replace('/', '-')}-{c['method']}",
        lambda c, world: finetune_setup(c),
        lambda c: c["model"],
        lambda c, out, setup, **run: run_finetune(c, out, setup=setup, **run),
        _finetune_done,
    ),
}


def cmd_train(args: argparse.Namespace) -> int:
    """``pretrain`` and ``finetune``: the run folder's lock is taken before anything is read from it (by rank 0
    of torchrun), so a resume picks its checkpoint only once no other process can write a newer one."""
    import contextlib
    import os

    from .train.allocator import return_freed_memory

    return_freed_memory()  # before a checkpoint is read: what its load frees goes back to the OS (glibc)
    command, name, load, model, train, done = TRAINING[args.command]
    out = target(args, command, name)
    with RunLock(out, create=True) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        cfg, resume = resolve_run(args, command)
        command.validate(cfg)
        runfolder.check(out, resume, args.overwrite, command.name)
        parallel = Parallel(args.fsdp, args.shard_updates, cfg["device"])
        try:
            loaded = parallel.first(lambda: load(cfg, parallel.world))
            if not args.no_memory_check:
                from .plan.command import check_run

                check_run(args, command, cfg, loaded, parallel)
            if parallel.main:
                resuming = f"; resuming at step {resume['step']}" if resume else ""
                ranks = f"; {parallel.world} processes, {parallel.strategy}" if parallel.world > 1 else ""
                print(
                    f"gradspace {command.name}: {model(cfg)}, {cfg['method']} ({cfg['base']}), {loaded.info}; run "
                    f"folder {out}{resuming}{ranks}",
                    file=sys.stderr,
                )
            summary = train(
                cfg, out, loaded, resume=resume, stop_after=args.stop_after, parallel=parallel, overwrite=args.overwrite
            )
            parallel.barrier()  # no rank tears the process group down while rank 0 still exports (gloo aborts)
        finally:
            parallel.close()
    if parallel.main:
        print(done(summary, out))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan.command import run

    return run(args)


def cmd_compare(args: argparse.Namespace) -> int:
    both = {**PRETRAIN.defaults, **FINETUNE.defaults}
    file_cfg = read_config_file(args.config, both) if args.config else {}
    finetune = "task" in vars(args) or "task" in file_cfg
    defaults = (FINETUNE if finetune else PRETRAIN).defaults
    other = sorted(k for k in {*vars(args), *file_cfg} if k in set(both) - set(defaults))
    if other:
        mode = "fine-tuning (--task)" if finetune else "pretraining (no --task)"
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in other)} do(es) not apply to comparing {mode}")
    explicit = explicit_options(args, defaults)
    given = vars(args).get("methods")
    methods = parse_methods(given if given is not None else file_cfg.get("methods", DEFAULT_COMPARE))
    cfg = {**defaults, **explicit}
    own = {k: vars(args).get(k, file_cfg.get(k, v)) for k, v in COMPARE_OPTIONS.items()}
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    run_compare(cfg, methods, out, stop_after=args.stop_after, overwrite=args.overwrite, **own)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .train.export import sample

    _threads(args)
    print(sample(Path(args.run), args.prompt, args.max_new_tokens, args.seed, args.temperature, chat=not args.raw))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.harness import evaluate, lines

    _threads(args)
    print("\n".join(lines(evaluate(args))))
    return 0


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_export(args: argparse.Namespace) -> int:
    from .train.rebuild import export_run

    _threads(args)
    folder, step, adapter = export_run(args.run, args.overwrite, args.lora_rank, args.lora_energy)
    print(f"exported the model of step {step} to {folder}" + (f"\n{adapter}" if adapter else ""))
    return 0


def _suggest(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An unknown option is an error that names the closest known one (argparse alone only says "unrecognized")."""
    sub = next((a for a in argv if a in parser._subparsers._group_actions[0].choices), None)
    if sub is None:
        return
    options = list(parser._subparsers._group_actions[0].choices[sub]._option_string_actions)
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and not any(o == name or o.startswith(name) for o in options):
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; see `gradspace {sub} --help`"
            parser.exit(2, f"gradspace {sub}: error: unknown option {name}{hint}\n")


def main(argv: list[str] | None = None) -> int:
    from .train.parallel import exit_torn_down

    try:
        code = _main(argv)
    except SystemExit as stop:
        exit_torn_down(stop.code)
        raise
    exit_torn_down(code)
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _suggest(parser, argv)
    args = parser.parse_args(argv)
    from .train.checkpoint import CheckpointError

    commands = {
        "pretrain": cmd_train,
        "finetune": cmd_train,
        "compare": cmd_compare,
        "plan": cmd_plan,
        "sample": cmd_sample,
        "eval": cmd_eval,
        "export": cmd_export,
    }
    try:
        return commands[args.command](args)
    except (UsageError, CheckpointError) as err:
        parser.exit(2, f"gradspace: error: {err}\n")
    except RunDiverged as err:
        parser.exit(3, f"gradspace: error: {err}\n")
    except KeyboardInterrupt:  # before training started: nothing to save
        parser.exit(130, "gradspace: interrupted before training started; nothing was saved\n")
    except (ValueError, RuntimeError, OSError) as err:
        msg = str(err).strip().splitlines()
        parser.exit(1, f"gradspace: error: {msg[0] if msg else type(err).__name__}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
