"""Run configuration: each command's defaults, config files, validation, and a method's optimizer settings."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import optim_args
from ..baselines import BASELINES, is_known, is_projected, method_names, takes_rank
from ..methods import preset_projection
from . import options
from .errors import UsageError
from .options import COMPARE_KEYS, COMPARE_OPTIONS, DEFAULT_COMPARE, EVAL_BATCH, PRESET_NAMES, SCHEDULERS, TOKENIZERS

__all__ = ["COMPARE_KEYS", "COMPARE_OPTIONS", "DEFAULT_COMPARE", "EVAL_BATCH", "PRESET_NAMES", "SCHEDULERS"]
__all__ += ["TOKENIZERS", "Command", "UsageError", "explicit_options", "read_config_file"]

#: the seeds every consumer takes: torch's generators, and fine-tuning's data order (``seed * 1_000_003 + epoch``)
SEED_RANGE = (0, 2**32 - 1)


def read_config_file(path: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The options of a YAML, TOML or JSON file (keys as the flags, ``-`` or ``_``); unknown keys are an error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"config file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif file.suffix.lower() == ".json":  # YAML would read JSON's 1e-05 as a string
            import json

            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:
        raise UsageError(f"config file {file} does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {file} must hold a mapping of option names to values")
    from . import llamafactory

    if llamafactory.is_llamafactory(data):
        if "task" not in defaults:
            raise UsageError(f"config file {file} is a LLaMA-Factory file: run it with gradspace finetune --config")
        data = llamafactory.translate(data, file)
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "update_proj_gap" in out:  # the ecosystem's name, as the flag --update-proj-gap
        out["update_gap"] = out.pop("update_proj_gap")
    allowed = set(defaults) | set(COMPARE_KEYS)
    unknown = sorted(set(out) - allowed)
    if unknown:
        raise UsageError(
            f"config file {file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )
    return out


def explicit_options(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Config-file values overridden by the flags actually given."""
    given = read_config_file(args.config, defaults) if args.config else {}
    for key in COMPARE_KEYS:
        given.pop(key, None)
    flags = {k: v for k, v in vars(args).items() if k in defaults}
    return {**given, **flags}


def max_rank(preset: str) -> int:
    from .models import PRESETS

    hidden, intermediate, _, _ = PRESETS[preset]
    return min(hidden, intermediate)


def _validate_shared(cfg: dict[str, Any], positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    """Checks common to pretraining and fine-tuning configs."""
    if not is_known(cfg["method"]):
        raise UsageError(f"unknown method {cfg['method']!r}; choose one of {', '.join(method_names())}")
    for key in positive:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise UsageError(f"{key.replace('_', '-')} must be a positive integer, got {cfg[key]!r}")
    for key in non_negative:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise UsageError(f"{key.replace('_', '-')} must be a non-negative integer, got {cfg[key]!r}")
    for key in ("rank", "update_gap"):
        applies = is_projected(cfg["method"]) or (key == "rank" and takes_rank(cfg["method"]))
        if cfg.get(key) is not None and not applies:
            what = "full rank" if cfg["method"] == "adamw" else "not a subspace method"
            raise UsageError(f"--{key.replace('_', '-')} does not apply to method {cfg['method']} ({what})")
    for key in ("rank", "update_gap"):
        if cfg.get(key) is not None and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1):
            raise UsageError(f"{key.replace('_', '-')} must be a positive integer, got {cfg[key]!r}")
    low, high = SEED_RANGE
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not low <= seed <= high:
        raise UsageError(f"seed must be an integer from {low} to {high} (2**32 - 1), got {seed!r}")
    for key in ("lr", "scale"):  # None: the command's, per method
        if cfg.get(key) is not None:
            _finite(key, cfg[key], 0.0, strict=True)
    device = str(cfg["device"])
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available")
    elif device != "cpu" and not device.startswith("mps"):
        raise UsageError(f"unknown device {device!r}; use cpu or cuda[:N]")


def _finite(key: str, value: Any, low: float, strict: bool = False, hint: str = "") -> None:
    """A float option: a finite number (``inf`` and ``nan`` pass ``>=`` checks or reach the run as a NaN loss) at
    least ``low`` (``strict``: above it)."""
    kind = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not kind or not math.isfinite(value) or value < low or (strict and value == low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise UsageError(f"{key.replace('_', '-')} must be a finite number {bound}, got {value!r}{hint}")


def _validate_pretrain(cfg: dict[str, Any]) -> None:
    if cfg["seq_len"] < 2:  # a causal LM predicts token t+1 from tokens 1..t: one token has no target, NaN loss
        raise UsageError(f"seq-len {cfg['seq_len']} leaves no next token to predict: give --seq-len 2 or more")
    if cfg["eval_batches"] == 0 and cfg.get("streaming"):
        raise UsageError(
            "eval-batches 0 (the whole split) needs a local corpus: a streamed dataset's validation split has no "
            "end here; give --eval-batches 1 or more (default 10)"
        )
    if cfg["preset"] not in PRESET_NAMES:
        raise UsageError(f"unknown preset {cfg['preset']!r}; choose one of {', '.join(PRESET_NAMES)}")
    held_out = cfg.get("eval_dataset")
    if held_out is not None and not Path(str(held_out)).expanduser().exists():
        raise UsageError(f"--eval-dataset {held_out}: no such file or folder (a held-out .txt file or folder)")
    if held_out is not None and cfg.get("streaming"):
        raise UsageError("--eval-dataset reads a local file; a streamed dataset validates on its own split")
    model = cfg.get("model")
    if model is not None and not Path(str(model)).expanduser().exists():
        raise UsageError(
            f"--model {model}: no such folder or config file (a local Hugging Face causal-LM folder "
            "with config.json, and weights to continue from them)"
        )
    if cfg.get("rank") is not None and model is None:
        top = max_rank(cfg["preset"])
        if cfg["rank"] > top:
            raise UsageError(
                f"rank {cfg['rank']} does not fit preset {cfg['preset']}: the maximum allowed is {top} "
                "(its smallest projected weight dimension)"
            )
    tok = cfg.get("tokenizer") or "gpt2"
    if tok not in TOKENIZERS and not Path(str(tok)).expanduser().is_dir():
        raise UsageError(f"unknown tokenizer {tok!r}: gpt2, chars, or a local tokenizer folder (tokenizer.json ...)")
    if model is not None and tok == "chars":
        raise UsageError("--tokenizer chars builds its own vocabulary, which a pretrained --model does not have")
    if cfg.get("tokenizer") == "chars" and (cfg.get("streaming") or cfg.get("full_vocab")):
        raise UsageError("--tokenizer chars reads a local corpus as characters: drop --streaming and --full-vocab")
    if cfg["seq_len"] > 1024 and model is None:
        raise UsageError(f"seq-len {cfg['seq_len']} exceeds the models' 1024 positions")


def check_max_length(cfg: dict[str, Any], tokenizer: Any, pair: bool) -> None:
    """``--max-length`` must leave a token of text (of each text, for pairs) beside the model's special tokens:
    below that an example is only ``[CLS] [SEP]``, and shorter than the special tokens the tokenizer does not
    truncate at all (it warns and keeps whole texts)."""
    special = tokenizer.num_special_tokens_to_add(pair=pair) if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    need = special + (2 if pair else 1)
    if cfg["max_length"] < need:
        texts = "a token of each of its two texts" if pair else "a token of text"
        raise UsageError(
            f"max-length {cfg['max_length']} leaves no room for {texts} beside model {cfg['model']}'s {special} "
            f"special tokens: give --max-length {need} or more"
        )


#: preset -> (rank, update gap) of projected methods (GaLore's paper settings for the big ones)
PRESET_PROJECTION = {
    "tiny": (16, 50),
    "mini": (32, 50),
    "60m": (128, 200),
    "130m": (256, 200),
    "350m": (256, 200),
    "1b": (512, 200),
    "7b": (1024, 200),
}


def _pretrain_lr(cfg: dict[str, Any]) -> float:
    if cfg["preset"] in ("tiny", "mini"):
        return 3e-3
    return 1e-2 if is_projected(cfg["method"]) else 1e-3


@dataclass(frozen=True)
class Command:
    """What a training command's runs default to and how they are checked; its options (defaults, the keys a
    resumed run must keep, integer bounds) come from ``gradspace.train.options``, the learning rate and
    projection of each method from here."""

    name: str
    lr: Callable[[dict[str, Any]], float]
    projection: Callable[[dict[str, Any]], tuple[int, int, float]]  # (rank, update gap, scale) of a projected method
    extra_checks: Callable[[dict[str, Any]], None] = lambda cfg: None

    @property
    def defaults(self) -> dict[str, Any]:
        return options.defaults(self.name)

    @property
    def identity(self) -> tuple[str, ...]:
        """What fixes a run's trajectory: a resumed run must keep it (the others may change, e.g. more --steps)."""
        return options.identity(self.name)

    def validate(self, cfg: dict[str, Any]) -> None:
        _check_kinds(cfg, self.name)
        _validate_shared(cfg, options.bounded(self.name, "positive"), options.bounded(self.name, "non_negative"))
        _check_training_options(cfg)
        self.extra_checks(cfg)

    def settings(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The optimizer's lr and projection: the command's defaults, in place of which a preset may fix its own
        (APOLLO-Mini: rank 1, scale 128), overridden by the config."""
        out: dict[str, Any] = {"lr": cfg["lr"] if cfg.get("lr") is not None else self.lr(cfg)}
        if takes_rank(cfg["method"]) and not is_projected(cfg["method"]):  # a baseline's adapters or factors
            out["rank"] = cfg.get("rank") or self.projection(cfg)[0]
        if is_projected(cfg["method"]):
            rank, gap, scale = self.projection(cfg)
            own = preset_projection(cfg["method"])
            out.update(
                rank=cfg.get("rank") or own.get("rank", rank),
                update_proj_gap=cfg.get("update_gap") or gap,
                scale=cfg["scale"] if cfg.get("scale") is not None else own.get("scale", scale),
            )
        return out


def _check_kinds(cfg: dict[str, Any], command: str) -> None:
    """The table's choices and switches (a config file may give any value): ``--scheduler`` one of its
    schedules, ``layerwise`` true or false ..."""
    for option in options.options_of(command):
        value, flag = cfg.get(option.key), option.key.replace("_", "-")
        if option.choices and value not in option.choices and not (value is None and option.default is None):
            raise UsageError(f"unknown {flag} {value!r}; choose one of {', '.join(option.choices)}")
        if option.type is bool and not isinstance(value, bool):
            raise UsageError(f"{flag} must be true or false, got {value!r}")


def parse_optim_args(value: Any) -> dict[str, Any]:
    """``"eta=1.0,accumulate=false"`` (or a mapping, from a config file) -> ``{"eta": 1.0, "accumulate": False}``
    (``gradspace.optim_args``' grammar); bad input is a :class:`UsageError`."""
    try:
        return optim_args.parse(value, "optim-args")
    except ValueError as err:
        raise UsageError(f"{err} (e.g. --optim-args eta=1.0,accumulate=false)") from None


def _check_training_options(cfg: dict[str, Any]) -> None:
    _finite("weight_decay", cfg.get("weight_decay"), 0.0)
    _finite("grad_clip", cfg.get("grad_clip"), 0.0, hint=" (0 turns clipping off)")
    warmup = cfg.get("warmup")
    if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
        raise UsageError(f"warmup must be an integer >= 0, got {warmup!r}")
    if cfg.get("warmup") is not None and cfg["warmup"] >= cfg["steps"]:
        raise UsageError(f"warmup ({cfg['warmup']} steps) must be shorter than the run ({cfg['steps']} steps)")
    targets = cfg.get("target_modules")
    if targets is not None and (not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets)):
        raise UsageError(f"target-modules must be module names or patterns, comma-separated, got {targets!r}")
    parse_optim_args(cfg.get("optim_args"))
    from .reporters import parse as parse_reporters

    parse_reporters(cfg.get("report_to"))
    if cfg["layerwise"] and cfg["grad_clip"]:
        raise UsageError(
            "--layerwise steps every weight inside backward, before the whole gradient exists, so the gradient "
            "cannot be clipped by its global norm: add --grad-clip 0"
        )
    if cfg["method"] in BASELINES and not is_projected(cfg["method"]):
        _check_baseline(cfg)


def _check_baseline(cfg: dict[str, Any]) -> None:
    """What the baselines do not support (yet), as one-line errors before anything is built."""
    name, baseline = cfg["method"], BASELINES[cfg["method"]]
    for key, flag in (("layerwise", "--layerwise"), ("memory_budget", "--memory-budget")):
        if cfg.get(key):
            raise UsageError(f"{flag} is for the subspace methods; method {name} does not take it")
    if cfg.get("dtype") == "int8":
        raise UsageError(f"--dtype int8 is for the subspace methods; method {name} trains float32 or bfloat16")
    if baseline.base is not None and cfg.get("base") not in ("adamw", baseline.base):
        raise UsageError(f"method {name} is full-rank {baseline.base}; --base {cfg['base']} does not apply")
    if baseline.pretraining_only and "task" in cfg:
        raise UsageError(f"method {name} trains a factorised model from scratch: a pretraining baseline only")
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"method {name} under torchrun is not supported yet: run it in one process")
    try:
        baseline.check(baseline.options(parse_optim_args(cfg.get("optim_args")))[0], cfg["steps"])
    except ValueError as err:
        raise UsageError(str(err)) from None


PRETRAIN = Command(
    name="pretrain",
    lr=_pretrain_lr,
    projection=lambda cfg: (*PRESET_PROJECTION[cfg["preset"]], 0.25),
    extra_checks=_validate_pretrain,
)

#: fine-tuning: rank 8 and scale 2 are GaLore's GLUE settings for rank 8 (RoBERTa-base, lr 1e-5..3e-5); its gap of
#: 500 steps is for 30-epoch runs, 100 gives a few subspace updates in runs of a few hundred steps. lr 5e-5 (the
#: top of BERT's 2e-5..5e-5 range, the same for every method) because MiniLM is small and the default runs are a
#: fraction of an epoch.
FINETUNE = Command(name="finetune", lr=lambda cfg: 5e-5, projection=lambda cfg: (8, 100, 2.0))
COMMANDS = {c.name: c for c in (PRETRAIN, FINETUNE)}
