"""Every option of ``pretrain``, ``finetune`` and ``compare`` in one table: key, default per command, flag, help,
and its role. Adding an option is one line here (plus the code that reads it): the command-line flags, the
config-file keys, each command's defaults, the keys a resumed run must keep, the integer bounds checked, the keys a
``compare`` method may set (``galore:rank=8``) and those a resumed comparison may change are all derived from it.

A run's configuration stays a plain dict of these keys (JSON in ``config.json`` and in every checkpoint).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PRESET_NAMES = ("tiny", "mini", "60m", "130m", "350m", "1b", "7b")
#: pretraining vocabularies: GPT-2's BPE (compacted to the tokens the corpus uses, unless --full-vocab), or the
#: corpus's characters
TOKENIZERS = ("gpt2", "chars")
#: validation examples per forward pass in fine-tuning
EVAL_BATCH = 64
DEFAULT_COMPARE = "adamw,galore,fira,apollo,apollo-mini,subtrack++,osd,grassjump"
SCHEDULERS = (
    "cosine_with_min_lr",
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "polynomial",
    "cosine_with_restarts",
    "inverse_sqrt",
    "warmup_stable_decay",
)
PROJ_TYPES = ("std", "reverse_std", "left", "right")
#: supervised fine-tuning's named chat templates (``gradspace.train.chat.TEMPLATES``)
CHAT_TEMPLATES = ("default", "alpaca", "chatml", "llama3", "qwen", "empty")

TRAIN = ("pretrain", "finetune", "compare")  # an option of training runs, which a comparison passes on
PRE, FINE = ("pretrain", "compare"), ("finetune", "compare")


class Per(dict):
    """A value that differs by command: ``Per(pretrain=200, finetune=300)``."""


def _modules(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    help: Any = ""  #: a string or a :class:`Per`; ``{methods}`` is replaced by the methods registered now
    commands: tuple[str, ...] = TRAIN
    type: Callable | None = None  #: int, float, bool (a flag), or a parser of the flag's text
    choices: tuple[str, ...] | None = None
    flags: tuple[str, ...] = ()  #: default ``--key-with-dashes``
    identity: bool | tuple[str, ...] = False  #: fixes the trajectory: a resume must keep it (for these commands)
    per_method: bool = False  #: a compare method may set it (``galore:rank=8``); others are tracker/rule options
    runtime: bool = False  #: does not change the result: a resumed comparison may change it
    bound: str | None = None  #: "positive" or "non_negative" (an integer)
    append: bool = False  #: repeatable flag (its values are collected in a list)

    def default_for(self, command: str) -> Any:
        return self.default[command] if isinstance(self.default, Per) else self.default

    def keeps(self, command: str) -> bool:
        return self.identity is True or (isinstance(self.identity, tuple) and command in self.identity)

    def argparse(self, command: str) -> tuple[list[str], dict[str, Any]]:
        """``(flags, add_argument keywords)``; a flag not given stays out of the namespace (the config file or the
        defaults decide)."""
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS}
        if self.type is bool:
            kwargs["action"] = "store_true"
        elif self.append:
            kwargs["action"] = "append"
        elif self.type is not None:
            kwargs["type"] = self.type
        if self.choices:
            kwargs["choices"] = self.choices
        text = self.help.get(command, self.help.get("pretrain", "")) if isinstance(self.help, Per) else self.help
        if "{methods}" in text:
            from ..baselines import method_names

            text = text.replace("{methods}", ", ".join(method_names()))
        kwargs["help"] = text or None
        flags = list(self.flags) or ["--" + self.key.replace("_", "-")]
        if flags[0].lstrip("-").replace("-", "_") != self.key:
            kwargs["dest"] = self.key
        return flags, kwargs


OPTIONS: tuple[Option, ...] = (
    # what trains
    Option("method", "galore", "one of {methods} (default galore)", ("pretrain", "finetune"), identity=True),
    Option("base", "adamw", "inner rule: adamw, adamw8bit, lion, adafactor, sgd", identity=True, per_method=True),
    Option(
        "rank",
        None,  # None: the command's (by preset, d/4 for --model, 8 for fine-tuning)
        "subspace rank, or the adapters' or factors' rank of lora, dora, relora, lowrank "
        "(pretrain: by preset, tiny 16; finetune: 8; --model: d/4)",
        type=int,
        identity=True,
        per_method=True,
    ),
    Option(
        "update_gap",
        None,
        "steps between subspace updates",
        type=int,
        flags=("--update-proj-gap", "--update-gap"),
        identity=True,
        per_method=True,
    ),
    Option(
        "scale",
        None,  # None: the command's (pretrain 0.25, finetune 2), or the preset's own (APOLLO 1, APOLLO-Mini 128)
        "update scale (GaLore: pretrain 0.25, finetune 2; APOLLO: x sqrt(scale), 1; mini 128)",
        type=float,
        identity=True,
        per_method=True,
    ),
    Option("proj_type", "std", "side projected", choices=PROJ_TYPES, identity=True, per_method=True),
    Option(
        "svd",
        None,  # None: the tracker's ("exact")
        "how SVD bases are computed (exact; randomized: a seeded range finder, much faster at 1B)",
        choices=("exact", "randomized"),
        identity=True,
        per_method=True,
    ),
    Option(
        "memory_budget",
        None,
        "a memory size (20GiB): instead of one rank, a rank per weight where the first gradient's energy is, so "
        "that the whole run's predicted peak fits it (--rank is then the most any weight gets)",
        PRE,
        identity=True,
        per_method=True,
    ),
    Option(
        "target_modules",
        None,  # None: the command's (pretrain: attention and MLP linears; finetune: the encoder's)
        "comma-separated names, substrings or regexes to project, or all-linear",
        type=_modules,
        identity=True,
    ),
    Option(
        "optim_args",
        None,  # {"eta": 1.0} or "eta=1.0,alpha=5"
        "tracker and rule options: key=value,... (eta=1.0, eta_th=0.02 ...)",
        identity=True,
    ),
    # the schedule
    Option(
        "lr",
        None,  # None: the command's, per method
        "learning rate (default per method and preset; finetune 5e-05)",
        type=float,
        identity=True,
        per_method=True,
    ),
    Option("weight_decay", 0.0, "decoupled weight decay (0)", type=float, identity=True, per_method=True),
    Option(
        "scheduler",
        "cosine_with_min_lr",
        "a transformers.get_scheduler schedule",
        choices=SCHEDULERS,
        identity=True,
        per_method=True,
    ),
    Option("warmup", None, "warm-up steps (10%% of --steps)", type=int, identity=True, per_method=True),
    Option("grad_clip", 1.0, "clip the gradient's global norm (1.0; 0: off)", type=float, per_method=True),
    Option(
        "steps",
        Per(pretrain=200, finetune=300),
        "optimizer steps (pretrain 200, finetune 300)",
        type=int,
        bound="positive",
    ),
    Option(
        "batch_size",
        Per(pretrain=8, finetune=16),
        "sequences per micro-batch (pretrain 8, finetune 16)",
        type=int,
        identity=True,
        bound="positive",
    ),
    Option("grad_accum", 1, "micro-batches per step (1)", type=int, identity=True, bound="positive"),
    Option(
        "layerwise",
        False,
        "step each weight inside backward, freeing its gradient (needs --grad-clip 0)",
        type=bool,
        identity=True,
        per_method=True,
    ),
    Option("grad_checkpointing", False, "recompute activations in backward instead of keeping them", type=bool),
    Option("compile", False, "torch.compile the model", type=bool),
    Option(
        "nonfinite",
        "error",
        "a non-finite loss or gradient: stop, or skip the step (and count it)",
        choices=("error", "skip"),
    ),
    Option("seed", 0, type=int, identity=True),
    Option("device", "cpu", "cpu, cuda, cuda:1, ... (cpu)"),
    Option(
        "dtype",
        "float32",
        "the weights' dtype (and the compute's); int8: the blocks' linear weights in 8 bits with per-group scales, "
        "the rest and the compute in bfloat16 where the CPU or GPU is fast in it, else float32",
        choices=("float32", "bfloat16", "int8"),
        identity=True,
    ),
    Option(
        "weight_rounding",
        "auto",
        "how an update is written into bfloat16 or int8 weights: nearest, or stochastic (unbiased: small updates "
        "survive); auto: stochastic for int8, nearest for bfloat16",
        choices=("auto", "nearest", "stochastic"),
        identity=True,
        per_method=True,
    ),
    # the model and the data
    Option("preset", "tiny", "LLaMA size: " + ", ".join(PRESET_NAMES) + " (default tiny)", PRE, identity=True),
    Option(
        "model",
        Per(pretrain=None, finetune="minilm"),
        Per(
            pretrain="a local Hugging Face causal-LM folder or config.json, instead of --preset",
            finetune="minilm (default), a local folder (BERT, GPT-2 ...), or a hub name",
            compare="pretraining: a causal-LM folder or config.json instead of --preset; fine-tuning (--task): "
            "minilm (default), a local folder, or a hub name",
        ),
        identity=True,
    ),
    Option(
        "fresh",
        False,
        "with --model: initialise fresh, ignoring the folder's weights",
        ("pretrain",),
        bool,
        identity=True,
    ),
    Option(
        "dataset",
        "shakespeare",
        "shakespeare, bible, wiki, builtin, a .txt file or folder, or a Hugging Face dataset name with "
        "--streaming (default shakespeare)",
        PRE,
        identity=True,
    ),
    Option("streaming", False, "stream a Hugging Face dataset", PRE, bool, identity=True),
    Option("seq_len", 64, "tokens per sequence (64)", PRE, int, identity=True, bound="positive"),
    Option(
        "full_vocab", False, "keep GPT-2's 50,257 tokens (default: only those in the corpus)", PRE, bool, identity=True
    ),
    Option(
        "tokenizer", "gpt2", "gpt2 (default), chars (the corpus's characters), or a local folder", PRE, identity=True
    ),
    Option(
        "task",
        "rotten-tomatoes",
        "rotten-tomatoes, review-ratings, trec, sms-spam, a CSV/TSV/JSONL file, a folder with train.* and valid.* "
        "files, or glue/<name> (needs datasets and a network); instruction data for a causal LM: synth-instruct "
        "(built in) or a JSONL/JSON/CSV/Parquet file of alpaca, chat (messages) or prompt/completion rows",
        FINE,
        identity=True,
    ),
    Option(
        "max_length", 128, "tokens per example, longer ones are cut (128)", FINE, int, identity=True, bound="positive"
    ),
    Option(
        "objective",
        "auto",
        "classify (a task head on an encoder or LM) or sft (a causal LM's responses to instructions); auto: sft "
        "for instruction data",
        FINE,
        choices=("auto", "classify", "sft"),
        identity=True,
    ),
    Option(
        "template",
        "auto",
        "sft: the chat format, " + ", ".join(CHAT_TEMPLATES) + " (auto: the tokenizer's own, else default)",
        FINE,
        choices=("auto", *CHAT_TEMPLATES),
        identity=True,
    ),
    Option("train_on_prompt", False, "sft: take the loss on prompt tokens too", FINE, bool, identity=True),
    Option("packing", False, "sft: join short examples into rows of --max-length tokens", FINE, bool, identity=True),
    Option(
        "max_samples",
        0,
        "sft: train on the first N examples only (0: all)",
        FINE,
        int,
        identity=True,
        bound="non_negative",
    ),
    Option(
        "val_size",
        0.1,
        "sft: held-out examples of a --task file without --eval-dataset, a share (below 1) or a count (0.1)",
        FINE,
        float,
        identity=True,
    ),
    Option(
        "eval_prompts",
        8,
        "sft: greedy answers to this many held-out prompts at each evaluation, scored by exact match and written "
        "to RUN/samples/ (8; 0: none)",
        FINE,
        int,
        bound="non_negative",
    ),
    # evaluation and logging
    Option(
        "eval_dataset",
        None,
        "held-out data: pretrain, a .txt file or folder (default: the last 5%% of --dataset); finetune, a "
        "CSV/TSV/JSONL file for a --task file (default: 10%% of its rows)",
        identity=("finetune",),  # fine-tuning carves its validation rows out of the task otherwise
    ),
    Option(
        "eval_every",
        Per(pretrain=50, finetune=100),
        "validate every N steps (pretrain 50, finetune 100; 0: only at the end)",
        type=int,
        bound="non_negative",
    ),
    Option(
        "eval_batches",
        Per(pretrain=10, finetune=0),
        f"validation batches (pretrain: N fixed random batches, 10; finetune: N x {EVAL_BATCH} examples, all by "
        "default); 0 = the whole validation split",
        type=int,
        bound="non_negative",
    ),
    Option(
        "save_every", 0, "checkpoint every N steps (0: only at the end)", type=int, runtime=True, bound="non_negative"
    ),
    Option(
        "log_every",
        10,
        "a metrics.jsonl line (the window's mean loss) every N steps (10)",
        type=int,
        runtime=True,
        bound="positive",
    ),
    Option("report_to", "jsonl", "besides metrics.jsonl: tensorboard, wandb (offline), comma-separated", runtime=True),
    Option("threads", 0, "torch CPU threads (0: torch's default)", type=int, runtime=True, bound="non_negative"),
    # a comparison's own
    Option(
        "methods",
        None,
        f"comma-separated (default {DEFAULT_COMPARE}); a method may carry options, adarank:eta_th=0.02 or "
        "galore:rank=8;update_gap=100",
        ("compare",),
    ),
    Option("seeds", 1, "seeds per method, from --seed on (1); the report shows mean +- sd", ("compare",), int),
    Option(
        "lr_grid",
        None,
        "learning rates to tune over: 1e-3,3e-3,1e-2 for every method, or galore=1e-3,3e-3 for one (repeatable); "
        "the best short run's rate is used",
        ("compare",),
        append=True,
    ),
    Option(
        "lr_from",
        None,
        "an earlier compare's folder or metrics.json: each method not in --lr-grid runs at the rate it chose there",
        ("compare",),
    ),
    Option("tune_fraction", 0.25, "a tuning run's share of --steps (0.25)", ("compare",), float),
    Option("jobs", 1, "runs at once, each with its share of the CPU threads (1)", ("compare",), int),
)
BY_KEY = {o.key: o for o in OPTIONS}


def options_of(command: str) -> list[Option]:
    return [o for o in OPTIONS if command in o.commands]


def defaults(command: str) -> dict[str, Any]:
    """A training command's options and their defaults (None: the command decides, e.g. rank by preset)."""
    return {o.key: o.default_for(command) for o in options_of(command)}


def identity(command: str) -> tuple[str, ...]:
    return tuple(o.key for o in options_of(command) if o.keeps(command))


def bounded(command: str, bound: str) -> tuple[str, ...]:
    return tuple(o.key for o in options_of(command) if o.bound == bound)


#: a comparison's own options (not passed to its runs) and their defaults
COMPARE_OPTIONS = {o.key: o.default for o in OPTIONS if o.commands == ("compare",) and o.key != "methods"}
#: a config file's keys that only ``gradspace compare`` reads
COMPARE_KEYS = tuple(o.key for o in OPTIONS if o.commands == ("compare",))
#: what a compare method's options may set directly; any other key is a tracker or rule option
PER_METHOD = tuple(o.key for o in OPTIONS if o.per_method)
#: options that do not change a run's result: they may differ when a comparison resumes
RUNTIME = tuple(o.key for o in OPTIONS if o.runtime)


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """``command``'s flags, in this table's order."""
    for option in options_of(command):
        flags, kwargs = option.argparse(command)
        parser.add_argument(*flags, **kwargs)
