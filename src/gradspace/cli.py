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

from .methods import METHODS
from .train import runfolder
from .train.compare import parse_methods, run_compare
from .train.config import (
    COMPARE_OPTIONS,
    DEFAULT_COMPARE,
    EVAL_BATCH,
    FINETUNE,
    PRESET_NAMES,
    PRETRAIN,
    SCHEDULERS,
    UsageError,
    explicit_options,
    read_config_file,
)
from .train.encoder import FinetuneSetup
from .train.parallel import Parallel
from .train.runfolder import RunLock, resolve_run, target
from .train.runner import run_finetune, run_pretrain
from .train.streams import Data
from .train.summary import RunDiverged

# ---------------------------------------------------------------------------------------------- arguments
S = argparse.SUPPRESS  # a flag not given stays out of the namespace: the config file or the defaults decide
INT, FLOAT, FLAG = {"type": int, "default": S}, {"type": float, "default": S}, {"action": "store_true", "default": S}
#: (flags, argparse keywords) of each group; every value's default lives in gradspace.train.config
SHARED = [
    (["--base"], {"default": S, "help": "inner rule: adamw, adamw8bit, lion, adafactor, sgd"}),
    (["--rank"], {**INT, "help": "subspace rank (pretrain: by preset, tiny 16; finetune: 8; --model: d/4)"}),
    (["--update-proj-gap", "--update-gap"], {**INT, "dest": "update_gap", "help": "steps between subspace updates"}),
    (["--proj-type"], {"default": S, "choices": ("std", "reverse_std", "left", "right"), "help": "side projected"}),
    (
        ["--svd"],
        {
            "default": S,
            "choices": ("exact", "randomized"),
            "help": "how SVD bases are computed (exact; randomized: a seeded range finder, much faster at 1B)",
        },
    ),
    (
        ["--target-modules"],
        {
            "type": lambda v: [x.strip() for x in v.split(",") if x.strip()],
            "default": S,
            "help": "comma-separated names, substrings or regexes to project, or all-linear",
        },
    ),
    (
        ["--eval-dataset"],
        {
            "default": S,
            "help": "held-out data: pretrain, a .txt file or folder (default: the last 5%% of --dataset); "
            "finetune, a CSV/TSV/JSONL file for a --task file (default: 10%% of its rows)",
        },
    ),
    (["--optim-args"], {"default": S, "help": "tracker and rule options: key=value,... (eta=1.0, eta_th=0.02 ...)"}),
    (
        ["--scale"],
        {
            **FLOAT,
            "help": "update scale (GaLore: pretrain 0.25, finetune 2; APOLLO: x sqrt(scale), 1; mini 128)",
        },
    ),
    (["--lr"], {**FLOAT, "help": f"learning rate (default per method and preset; finetune {FINETUNE.lr({}):g})"}),
    (["--weight-decay"], {**FLOAT, "help": "decoupled weight decay (0)"}),
    (["--scheduler"], {"default": S, "choices": SCHEDULERS, "help": "a transformers.get_scheduler schedule"}),
    (["--warmup"], {**INT, "help": "warm-up steps (10%% of --steps)"}),
    (["--grad-clip"], {**FLOAT, "help": "clip the gradient's global norm (1.0; 0: off)"}),
    (["--steps"], {**INT, "help": "optimizer steps (pretrain 200, finetune 300)"}),
    (["--batch-size"], {**INT, "help": "sequences per micro-batch (pretrain 8, finetune 16)"}),
    (["--grad-accum"], {**INT, "help": "micro-batches per step (1)"}),
    (["--layerwise"], {**FLAG, "help": "step each weight inside backward, freeing its gradient (needs --grad-clip 0)"}),
    (["--grad-checkpointing"], {**FLAG, "help": "recompute activations in backward instead of keeping them"}),
    (["--compile"], {**FLAG, "help": "torch.compile the model"}),
    (
        ["--nonfinite"],
        {"default": S, "choices": ("error", "skip"), "help": "a non-finite loss or gradient: stop or skip"},
    ),
    (["--seed"], INT),
    (["--device"], {"default": S, "help": "cpu, cuda, cuda:1, ... (cpu)"}),
    (["--dtype"], {"default": S, "choices": ("float32", "bfloat16")}),
    (["--eval-every"], {**INT, "help": "validate every N steps (pretrain 50, finetune 100; 0: only at the end)"}),
    (
        ["--eval-batches"],
        {
            **INT,
            "help": f"validation batches (pretrain: N fixed random batches, 10; finetune: N x {EVAL_BATCH} "
            "examples, all by default); 0 = the whole validation split",
        },
    ),
    (["--save-every"], {**INT, "help": "checkpoint every N steps (0: only at the end)"}),
    (["--log-every"], {**INT, "help": "a metrics.jsonl line (the window's mean loss) every N steps (10)"}),
    (["--report-to"], {"default": S, "help": "besides metrics.jsonl: tensorboard, wandb (offline), comma-separated"}),
    (["--threads"], {**INT, "help": "torch CPU threads (0: torch's default)"}),
    (["--out"], {"default": None, "help": "run folder (default runs/<name>-<timestamp>)"}),
    (["--overwrite"], {"action": "store_true", "help": "replace the run that --out already holds"}),
    (["--config"], {"default": None, "help": "YAML, TOML or JSON file with the same keys; flags override it"}),
    (["--stop-after"], {"type": int, "default": None, "help": S}),  # tests: act as if Ctrl-C after step N
]
PRETRAINING = [
    (["--preset"], {"default": S, "help": "LLaMA size: " + ", ".join(PRESET_NAMES) + " (default tiny)"}),
    (
        ["--dataset"],
        {
            "default": S,
            "help": "shakespeare, bible, wiki, builtin, a .txt file or folder, or a Hugging "
            "Face dataset name with --streaming (default shakespeare)",
        },
    ),
    (["--streaming"], {**FLAG, "help": "stream a Hugging Face dataset"}),
    (["--seq-len"], {**INT, "help": "tokens per sequence (64)"}),
    (["--full-vocab"], {**FLAG, "help": "keep GPT-2's 50,257 tokens (default: only those in the corpus)"}),
    (["--tokenizer"], {"default": S, "help": "gpt2 (default), chars (the corpus's characters), or a local folder"}),
]
FINETUNING = [
    (
        ["--task"],
        {
            "default": S,
            "help": "rotten-tomatoes, review-ratings, trec, sms-spam, a CSV/TSV/JSONL file, a folder with "
            "train.* and valid.* files, or glue/<name> (needs datasets and a network)",
        },
    ),
    (["--model"], {"default": S, "help": "minilm (default), a local folder (BERT, GPT-2 ...), or a hub name"}),
    (["--max-length"], {**INT, "help": "tokens per example, longer ones are cut (128)"}),
]
OWN_MODEL = [
    (["--model"], {"default": S, "help": "a local Hugging Face causal-LM folder or config.json, instead of --preset"}),
    (["--fresh"], {**FLAG, "help": "with --model: initialise fresh, ignoring the folder's weights"}),
]
PARALLEL = [
    (["--fsdp"], {"action": "store_true", "help": "under torchrun: shard the model with FSDP2 (default DDP)"}),
    (["--shard-updates"], {"action": "store_true", "help": "under torchrun: each subspace update on one rank"}),
]
SAMPLE = [
    (["run"], {"help": "a run folder (its model/ folder) or a Hugging Face model folder"}),
    (
        ["--prompt"],
        {
            "default": "\n",
            "help": "the text to continue (a newline); '' starts from the tokenizer's BOS (else EOS) token, or a "
            "newline where it has none (--tokenizer chars) or the model never trained on it, and prints only the "
            "new text",
        },
    ),
    (["--max-new-tokens"], {"type": int, "default": 200}),
    (
        ["--temperature"],
        {"type": float, "default": 0.8, "help": "sampling temperature (0.8); 0: greedy decoding (do_sample=False)"},
    ),
    (["--seed"], {"type": int, "default": 0}),
    (["--threads"], {"type": int, "default": 0}),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradspace", description="Train language models in a low-rank gradient subspace (GaLore and successors)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    methods = {"default": S, "help": "one of " + ", ".join(METHODS) + " (default galore)"}
    resume = {"default": None, "help": "a checkpoint file, or a run folder (its newest readable checkpoint)"}
    commands = {
        "pretrain": (
            "pretrain a LLaMA preset, or your own causal LM (--model), on a corpus",
            [(["--method"], methods), (["--resume"], resume), *OWN_MODEL, *SHARED, *PRETRAINING, *PARALLEL],
        ),
        "finetune": (
            "fine-tune a pretrained model on a classification or regression task",
            [(["--method"], methods), (["--resume"], resume), *SHARED, *PARALLEL, *FINETUNING],
        ),
        "sample": ("print text that a pretrained run's model writes after a prompt", SAMPLE),
        "export": (
            "write a run's model folder (RUN/model) from its newest good checkpoint, without training",
            [
                (
                    ["run"],
                    {"help": "a run folder (its newest checkpoint that loads) or a checkpoint file (its step)"},
                ),
                (["--threads"], {"type": int, "default": 0}),
            ],
        ),
        "compare": (
            "run several methods on identical data, seed and budget; write a report (fine-tuning with --task)",
            [
                (
                    ["--methods"],
                    {
                        "default": None,
                        "help": f"comma-separated (default {DEFAULT_COMPARE}); a method may carry options, "
                        "adarank:eta_th=0.02 or galore:rank=8;update_gap=100",
                    },
                ),
                (["--seeds"], {**INT, "help": "seeds per method, from --seed on (1); the report shows mean +- sd"}),
                (
                    ["--lr-grid"],
                    {
                        "action": "append",
                        "default": S,
                        "help": "learning rates to tune over: 1e-3,3e-3,1e-2 for every method, or "
                        "galore=1e-3,3e-3 for one (repeatable); the best short run's rate is used",
                    },
                ),
                (["--tune-fraction"], {**FLOAT, "help": "a tuning run's share of --steps (0.25)"}),
                (["--jobs"], {**INT, "help": "runs at once, each with its share of the CPU threads (1)"}),
                *SHARED,
                *PRETRAINING,
                *FINETUNING,
            ],
        ),
    }
    for name, (help_, flags) in commands.items():
        sp = sub.add_parser(name, help=help_)
        for names, kwargs in flags:
            sp.add_argument(*names, **kwargs)
    return p


def _locked(args: argparse.Namespace, command, name):
    """The run folder, and its lock taken before anything is read from it (rank 0 of torchrun takes it): a resume
    picks its checkpoint only once no other process can write a newer one."""
    import contextlib
    import os

    out = target(args, command, name)
    main = os.environ.get("RANK", "0") == "0"
    return out, (RunLock(out, create=True) if main else contextlib.nullcontext())


def cmd_pretrain(args: argparse.Namespace) -> int:
    out, lock = _locked(args, PRETRAIN, lambda c: f"{c['preset']}-{c['method']}")
    with lock:
        return _pretrain(args, out)


def _pretrain(args: argparse.Namespace, out: Path) -> int:
    cfg, resume = resolve_run(args, PRETRAIN)
    PRETRAIN.validate(cfg)
    runfolder.check(out, resume, args.overwrite, "pretrain")
    parallel = Parallel(args.fsdp, args.shard_updates, cfg["device"])
    try:
        data = parallel.first(lambda: Data(cfg, parallel.world))
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
    out, lock = _locked(args, FINETUNE, lambda c: f"{_task_slug(c['task'])}-{c['method']}")
    with lock:
        return _finetune(args, out)


def _finetune(args: argparse.Namespace, out: Path) -> int:
    cfg, resume = resolve_run(args, FINETUNE)
    FINETUNE.validate(cfg)
    runfolder.check(out, resume, args.overwrite, "finetune")
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
    own = {k: vars(args).get(k, file_cfg.get(k, v)) for k, v in COMPARE_OPTIONS.items()}
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    run_compare(cfg, methods, out, stop_after=args.stop_after, overwrite=args.overwrite, **own)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .train.export import sample

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(sample(Path(args.run), args.prompt, args.max_new_tokens, args.seed, temperature=args.temperature))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .train.rebuild import export_run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    folder, step = export_run(args.run)
    print(f"exported the model of step {step} to {folder}")
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
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _suggest(parser, argv)
    args = parser.parse_args(argv)
    from .train.checkpoint import CheckpointError

    commands = {
        "pretrain": cmd_pretrain,
        "finetune": cmd_finetune,
        "compare": cmd_compare,
        "sample": cmd_sample,
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
