"""LLaMA-Factory's training YAML files, run as they are: ``gradspace finetune --config llama3_full_sft.yaml``.

A config file holding LLaMA-Factory's keys (``model_name_or_path``, ``stage``, ``use_galore`` ...) is translated
key by key through :data:`KEYS`: each key is mapped to a gradspace option, or listed as having no effect here
(reported once at the start of the run, with the reason). A key outside the table is an error naming it, never
silently dropped. Where the file gives no value, LLaMA-Factory's default (or the Hugging Face Trainer's, which it
inherits) is used, except where the table says why not. ``dataset`` names local files (comma-separated, under
``dataset_dir`` when given), not entries of LLaMA-Factory's ``dataset_info.json``; relative paths are taken
from where the command runs, as LLaMA-Factory takes them.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

#: key -> what it does here (the README's table is generated from this, and tested against it)
KEYS: dict[str, str] = {
    # model and method
    "model_name_or_path": "`--model` (a local folder)",
    "stage": "`sft` only (anything else is an error)",
    "do_train": "must be true (gradspace trains)",
    "finetuning_type": "`full` (with `use_galore`, `use_apollo`, `use_badam`, or none: `--method adamw`) or `lora` "
    "(`--method lora`); LLaMA-Factory's default `lora`",
    "use_galore": "`--method galore`",
    "galore_target": "`--target-modules` (`all`: every linear layer but the output head); default `all`",
    "galore_rank": "`--rank` (16)",
    "galore_update_interval": "`--update-gap` (200)",
    "galore_scale": "`--scale` (2.0)",
    "galore_proj_type": "`--proj-type` (std)",
    "galore_layerwise": "`--layerwise` (false)",
    "use_apollo": "`--method apollo`",
    "apollo_target": "`--target-modules` (all)",
    "apollo_rank": "`--rank` (16)",
    "apollo_update_interval": "`--update-gap` (200)",
    "apollo_scale": "`--scale` (32.0)",
    "apollo_proj": "`random` only (APOLLO's random projection)",
    "apollo_proj_type": "`--proj-type` (std)",
    "apollo_scale_type": "the rule's `scale_type` (`channel`; `tensor` with rank 1 is APOLLO-Mini)",
    "apollo_scale_front": "false only",
    "apollo_layerwise": "`--layerwise` (false)",
    "use_badam": "`--method badam`",
    "badam_mode": "`layer` only (BAdam's ratio mode is not supported)",
    "badam_switch_mode": "the baseline's `switch_mode` (ascending)",
    "badam_switch_interval": "the baseline's `switch_block_every` (50)",
    "badam_update_ratio": "no effect: it is used by the ratio mode only",
    "badam_verbose": "no effect: gradspace logs its own metrics",
    "lora_rank": "`--rank` of `--method lora` (8)",
    "lora_alpha": "the adapter's `lora_alpha` (twice the rank)",
    "lora_dropout": "the adapter's `lora_dropout` (0)",
    "lora_target": "`--target-modules` (all)",
    # data
    "dataset": "`--task`: local files (JSONL, JSON, CSV, Parquet; comma-separated: joined)",
    "dataset_dir": "the folder of the `dataset` files",
    "eval_dataset": "`--eval-dataset` (a local file; every `dataset` row then trains)",
    "template": "`--template` (default, alpaca, chatml, llama3, qwen, empty; none given: the tokenizer's own)",
    "cutoff_len": "`--max-length` (2048)",
    "max_samples": "`--max-samples` (all)",
    "val_size": "`--val-size`; gradspace always holds out examples (10% when not given) so that every run "
    "reports a held-out loss",
    "train_on_prompt": "`--train-on-prompt` (false)",
    "packing": "`--packing` (false)",
    # training
    "learning_rate": "`--lr` (5e-5)",
    "num_train_epochs": "`--steps`: epochs x training examples / (batch x accumulation x processes), rounded up "
    "(3.0; with `packing`, give `max_steps`)",
    "max_steps": "`--steps` when positive (it wins over `num_train_epochs`, as in the Trainer)",
    "per_device_train_batch_size": "`--batch-size` (8)",
    "gradient_accumulation_steps": "`--grad-accum` (1)",
    "lr_scheduler_type": "`--scheduler` (linear)",
    "warmup_ratio": "`--warmup`: the ratio of `--steps`, rounded up (0)",
    "warmup_steps": "`--warmup` (a value below 1 is a ratio, as in recent transformers) (0)",
    "weight_decay": "`--weight-decay` (0)",
    "max_grad_norm": "`--grad-clip` (1.0; 0 with `galore_layerwise`/`apollo_layerwise`, which cannot clip)",
    "seed": "`--seed` (42)",
    "pure_bf16": "`--dtype bfloat16` (weights and compute in bfloat16)",
    "bf16": "no effect: gradspace has no mixed-precision autocast; it computes in `--dtype` (float32 unless "
    "`pure_bf16`)",
    "logging_steps": "`--log-every` (500; below 1: a share of the steps)",
    "save_steps": "`--save-every` (500; below 1: a share of the steps)",
    "eval_steps": "`--eval-every` with `eval_strategy: steps` (`logging_steps` when not given; below 1: a share)",
    "eval_strategy": "`no`: evaluate at the end only; `steps`: every `eval_steps`; `epoch`: once an epoch",
    "evaluation_strategy": "the older name of `eval_strategy`",
    "per_device_eval_batch_size": "no effect: validation runs 8 examples at a time",
    "output_dir": "the run folder (`--out` wins)",
    "overwrite_output_dir": "no effect: a config file never replaces a run folder; pass `--overwrite`",
    "report_to": "`--report-to` (`none`: metrics.jsonl only)",
    # machinery
    "overwrite_cache": "no effect: nothing is cached between runs",
    "preprocessing_num_workers": "no effect: tokenizing runs in the training process",
    "plot_loss": "no effect: every run plots its curves",
    "ddp_timeout": "no effect: the process group uses torch's timeout",
    "trust_remote_code": "no effect: models load with the classes transformers ships",
    "dataloader_num_workers": "no effect: batches are made in the training process",
    "save_only_model": "no effect: checkpoints always hold what an exact resume needs",
    "resume_from_checkpoint": "null only: resume with `gradspace finetune --resume RUN`",
}
#: keys that only LLaMA-Factory's files have: one of them makes a config file a LLaMA-Factory file
MARKERS = ("model_name_or_path", "stage", "finetuning_type", "use_galore", "use_apollo", "use_badam", "cutoff_len")
_reported: set[str] = set()


def is_llamafactory(data: dict[str, Any]) -> bool:
    return any(k in data for k in MARKERS)


def no_effect(data: dict[str, Any]) -> list[str]:
    return [k for k in data if KEYS[k].startswith("no effect")]


def file_output_dir(file: Path) -> Path | None:
    """A LLaMA-Factory file's ``output_dir``, or None (relative paths, as in LLaMA-Factory, from where the
    command runs)."""
    import yaml

    if file.suffix.lower() not in (".yaml", ".yml") or not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None  # reading the file for its options says what is wrong
    if not isinstance(data, dict) or not is_llamafactory(data) or data.get("output_dir") is None:
        return None
    return Path(str(data["output_dir"])).expanduser()


def translate(data: dict[str, Any], file: Path) -> dict[str, Any]:
    """gradspace ``finetune`` options from a LLaMA-Factory file's keys (see :data:`KEYS`)."""
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UsageError(
            f"config file {file}: LLaMA-Factory key(s) {', '.join(unknown)} have no counterpart in gradspace (the "
            "README's LLaMA-Factory table lists those that do): remove them"
        )
    d = data
    _require(d.get("stage", "sft") == "sft", file, f"stage {d.get('stage')!r}: only sft runs here")
    _require(d.get("do_train", True) is True, file, "do_train must be true: gradspace trains")
    if "model_name_or_path" not in d or "dataset" not in d:
        raise UsageError(f"config file {file}: give model_name_or_path and dataset (local files)")
    out: dict[str, Any] = {"objective": "sft", "model": str(d["model_name_or_path"])}
    out.update(_method(d, file))
    folder = Path(str(d.get("dataset_dir", "."))).expanduser()
    out["task"] = ",".join(str(folder / p.strip()) for p in str(d["dataset"]).split(",") if p.strip())
    if d.get("eval_dataset"):
        files = [p.strip() for p in str(d["eval_dataset"]).split(",") if p.strip()]
        _require(len(files) == 1, file, "eval_dataset: give one local file")
        out["eval_dataset"] = str(folder / files[0])
    _require(d.get("resume_from_checkpoint") is None, file, "resume_from_checkpoint: resume with --resume RUN")
    if "template" in d:
        out["template"] = str(d["template"])
    out["max_length"] = int(d.get("cutoff_len", 2048))
    for key, ours in (("max_samples", "max_samples"), ("val_size", "val_size"), ("train_on_prompt", "train_on_prompt")):
        if key in d:
            out[ours] = d[key]
    if "packing" in d:
        out["packing"] = d["packing"]  # checked as the option is: a string "false" is refused, not true
    out["lr"] = float(d.get("learning_rate", 5e-5))
    out["batch_size"] = int(d.get("per_device_train_batch_size", 8))
    out["grad_accum"] = int(d.get("gradient_accumulation_steps", 1))
    out["scheduler"] = str(d.get("lr_scheduler_type", "linear"))
    out["weight_decay"] = float(d.get("weight_decay", 0.0))
    # a layer-wise step never sees the whole gradient to clip; LLaMA-Factory's layer-wise examples leave
    # max_grad_norm at the Trainer's 1.0, so it is 0 here unless the file sets it
    out["grad_clip"] = float(d.get("max_grad_norm", 0.0 if out.get("layerwise") else 1.0))
    out["seed"] = int(d.get("seed", 42))
    if d.get("pure_bf16"):
        out["dtype"] = "bfloat16"
    logging = d.get("logging_steps", 500)
    if "report_to" in d:
        report = d["report_to"]
        report = ",".join(report) if isinstance(report, list) else str(report)
        out["report_to"] = "jsonl" if report in ("none", "") else report
    out["steps"], per_epoch = _steps(d, out, file)
    steps = out["steps"]
    out["warmup"] = _warmup(d, steps)
    out["log_every"] = _every(logging, steps, "logging_steps", file)
    out["save_every"] = _every(d.get("save_steps", 500), steps, "save_steps", file)
    strategy = d.get("eval_strategy", d.get("evaluation_strategy", "no"))
    strategy = "no" if strategy is False else str(strategy)  # YAML reads a bare no as false
    if strategy not in ("no", "steps", "epoch"):
        raise UsageError(f"config file {file}: eval_strategy {strategy!r}: use no, steps or epoch")
    if strategy == "steps":
        out["eval_every"] = _every(d.get("eval_steps") or logging, steps, "eval_steps", file)
    else:
        out["eval_every"] = per_epoch if strategy == "epoch" else 0
    _report(d, file)
    return out


def _require(ok: bool, file: Path, what: str) -> None:
    if not ok:
        raise UsageError(f"config file {file}: {what}")


def _method(d: dict[str, Any], file: Path) -> dict[str, Any]:
    """``method`` and its options from ``finetuning_type`` and ``use_*``, with LLaMA-Factory's defaults."""
    kind = str(d.get("finetuning_type", "lora"))
    chosen = [k for k in ("use_galore", "use_apollo", "use_badam") if d.get(k)]
    _require(kind in ("full", "lora"), file, f"finetuning_type {kind!r}: use full or lora")
    _require(len(chosen) <= 1, file, f"{' and '.join(chosen)}: choose one")
    _require(not (chosen and kind != "full"), file, f"{chosen[0] if chosen else ''} needs finetuning_type: full")
    targets = lambda key: _targets(d.get(key, "all"))  # noqa: E731
    if kind == "lora":
        rank = int(d.get("lora_rank", 8))
        args = f"lora_alpha={float(d.get('lora_alpha', 2 * rank))},lora_dropout={float(d.get('lora_dropout', 0.0))}"
        return {"method": "lora", "rank": rank, "target_modules": targets("lora_target"), "optim_args": args}
    if not chosen:
        return {"method": "adamw"}
    if chosen[0] == "use_galore":
        return {
            "method": "galore",
            "target_modules": targets("galore_target"),
            "rank": int(d.get("galore_rank", 16)),
            "update_gap": int(d.get("galore_update_interval", 200)),
            "scale": float(d.get("galore_scale", 2.0)),
            "proj_type": str(d.get("galore_proj_type", "std")),
            "layerwise": bool(d.get("galore_layerwise", False)),
        }
    if chosen[0] == "use_apollo":
        _require(str(d.get("apollo_proj", "random")) == "random", file, "apollo_proj: only random is supported")
        _require(not d.get("apollo_scale_front", False), file, "apollo_scale_front: only false is supported")
        return {
            "method": "apollo",
            "target_modules": targets("apollo_target"),
            "rank": int(d.get("apollo_rank", 16)),
            "update_gap": int(d.get("apollo_update_interval", 200)),
            "scale": float(d.get("apollo_scale", 32.0)),
            "proj_type": str(d.get("apollo_proj_type", "std")),
            "layerwise": bool(d.get("apollo_layerwise", False)),
            "optim_args": f"scale_type={d.get('apollo_scale_type', 'channel')}",
        }
    _require(str(d.get("badam_mode", "layer")) == "layer", file, "badam_mode: only layer is supported")
    every, mode = int(d.get("badam_switch_interval", 50)), str(d.get("badam_switch_mode", "ascending"))
    return {"method": "badam", "optim_args": f"switch_block_every={every},switch_mode={mode}"}


def _targets(value: Any) -> list[str]:
    names = value if isinstance(value, list) else [t.strip() for t in str(value).split(",") if t.strip()]
    return ["all-linear" if t == "all" else t for t in names]


def _steps(d: dict[str, Any], out: dict[str, Any], file: Path) -> tuple[int, int]:
    """``(steps, steps per epoch)``: ``max_steps`` when positive, else the epochs over the training examples."""
    import os

    from .sft import load_conversations

    per_step = out["batch_size"] * out["grad_accum"] * int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's ranks
    if int(d.get("max_steps", -1)) > 0 and d.get("eval_strategy", d.get("evaluation_strategy")) != "epoch":
        return int(d["max_steps"]), 0
    _require(
        not out.get("packing"),
        file,
        "packing with num_train_epochs: give max_steps (packed rows per epoch are only known once tokenized)",
    )
    eval_file = out.get("eval_dataset")
    train, _ = load_conversations(out["task"], eval_file, int(out.get("max_samples") or 0), out.get("val_size", 0.1))
    per_epoch = max(1, math.ceil(len(train) / per_step))
    if int(d.get("max_steps", -1)) > 0:
        return int(d["max_steps"]), per_epoch
    epochs = float(d.get("num_train_epochs", 3.0))
    _require(epochs > 0, file, f"num_train_epochs {epochs}: give a positive number (or max_steps)")
    return max(1, math.ceil(epochs * len(train) / per_step)), per_epoch


def _every(value: Any, steps: int, key: str, file: Path) -> int:
    """The Trainer's reading of ``logging_steps``/``save_steps``/``eval_steps``: a value below 1 is a share of the
    run's steps (rounded up), else a number of steps."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"config file {file}: {key} {value!r}: give a number of steps or a share below 1") from None
    _require(v > 0, file, f"{key} {value!r}: give a positive number of steps or a share below 1")
    return math.ceil(v * steps) if v < 1 else int(v)


def _warmup(d: dict[str, Any], steps: int) -> int:
    """The Trainer's rule: ``warmup_steps`` when positive (below 1: a ratio), else ``ceil(ratio x steps)``."""
    w = float(d.get("warmup_steps", 0) or 0)
    if w >= 1:
        return int(w)
    ratio = w if w > 0 else float(d.get("warmup_ratio", 0.0) or 0.0)
    return math.ceil(ratio * steps)


def _report(d: dict[str, Any], file: Path) -> None:
    """Once per file and process: which of its keys do nothing here."""
    if str(file) in _reported:
        return
    _reported.add(str(file))
    quiet = no_effect(d)
    if quiet:
        print(
            f"gradspace: {file.name} is a LLaMA-Factory file; no effect here: "
            + "; ".join(f"{k} ({KEYS[k][len('no effect: ') :]})" for k in quiet),
            file=sys.stderr,
        )


def table() -> str:
    """The README's table of :data:`KEYS`."""
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in KEYS.items())
    return "| LLaMA-Factory key | in gradspace |\n|---|---|\n" + rows
