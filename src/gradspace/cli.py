"""The ``gradspace`` command line: pretrain a LLaMA preset, fine-tune an encoder on a task, resume, compare.

    gradspace pretrain --preset tiny --method galore --steps 200 --out runs/tiny-galore
    gradspace pretrain --resume runs/tiny-galore          # continues from the newest checkpoint, bit-exactly
    gradspace finetune --task rotten-tomatoes --method galore --steps 300 --out runs/rt-galore
    gradspace compare --methods adamw,galore,subtrack --steps 150 --out runs/compare   # --task: fine-tuning
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .methods import METHODS

PRESET_NAMES = ("tiny", "mini", "60m", "130m", "350m", "1b", "7b")
DEFAULT_COMPARE = "adamw,galore,subtrack,osd,adarank,grasswalk,grassjump"
#: preset -> (rank, update gap) defaults for projected methods (GaLore's paper settings for the big ones)
PROJECTION_DEFAULTS = {"tiny": (16, 50), "mini": (32, 50), "60m": (128, 200), "130m": (256, 200),
                       "350m": (256, 200), "1b": (512, 200), "7b": (1024, 200)}
DEFAULTS: dict[str, Any] = {
    "preset": "tiny", "dataset": "shakespeare", "streaming": False, "method": "galore", "base": "adamw",
    "rank": None, "update_gap": None, "scale": 0.25, "lr": None, "steps": 200, "batch_size": 8, "seq_len": 64,
    "grad_accum": 1, "seed": 0, "device": "cpu", "dtype": "float32", "eval_every": 50, "eval_batches": 10,
    "save_every": 0, "log_every": 10, "threads": 0, "full_vocab": False, "grad_clip": 1.0,
}
#: keys a resumed run must share with its checkpoint (the others may change, e.g. more --steps)
IDENTITY = ("preset", "dataset", "method", "base", "rank", "update_gap", "scale", "batch_size", "seq_len",
            "grad_accum", "seed", "dtype", "full_vocab", "streaming")
#: fine-tuning: rank 8 and scale 2 are GaLore's GLUE settings for rank 8 (RoBERTa-base, lr 1e-5..3e-5); its gap of
#: 500 steps is for 30-epoch runs, 100 gives a few subspace updates in runs of a few hundred steps. lr 5e-5 (the
#: top of BERT's 2e-5..5e-5 range) because MiniLM is small and the default runs are a fraction of an epoch.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "task": "rotten-tomatoes", "model": "minilm", "method": "galore", "base": "adamw", "rank": None,
    "update_gap": None, "scale": 2.0, "lr": None, "steps": 300, "batch_size": 16, "max_length": 128,
    "grad_accum": 1, "seed": 0, "device": "cpu", "dtype": "float32", "eval_every": 100, "eval_batches": 0,
    "save_every": 0, "log_every": 10, "threads": 0, "grad_clip": 1.0,
}
FINETUNE_PROJECTION = (8, 100)  # rank, update gap
FINETUNE_LR = 5e-5
FINETUNE_IDENTITY = ("task", "model", "method", "base", "rank", "update_gap", "scale", "batch_size", "max_length",
                     "grad_accum", "seed", "dtype")
EVAL_BATCH = 64  # validation examples per forward pass in fine-tuning


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradspace", description="Train language models in a low-rank gradient "
                                "subspace (GaLore and successors).")
    sub = p.add_subparsers(dest="command", required=True)
    S = argparse.SUPPRESS

    def shared(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--base", default=S, help="inner rule: adamw, adamw8bit, lion, adafactor, sgd")
        sp.add_argument("--rank", type=int, default=S, help="subspace rank (pretrain: by preset, tiny 16; "
                        "finetune: 8)")
        sp.add_argument("--update-gap", type=int, default=S, help="steps between subspace updates (pretrain: by "
                        "preset; finetune: 100)")
        sp.add_argument("--scale", type=float, default=S, help="GaLore scale of projected updates (pretrain 0.25, "
                        "finetune 2)")
        sp.add_argument("--lr", type=float, default=S, help="learning rate (default per method and preset; "
                        f"finetune {FINETUNE_LR:g})")
        sp.add_argument("--steps", type=int, default=S, help="optimizer steps (pretrain 200, finetune 300)")
        sp.add_argument("--batch-size", type=int, default=S, help="sequences per micro-batch (pretrain 8, "
                        "finetune 16)")
        sp.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step (1)")
        sp.add_argument("--seed", type=int, default=S)
        sp.add_argument("--device", default=S, help="cpu, cuda, cuda:1, ... (cpu)")
        sp.add_argument("--dtype", default=S, choices=("float32", "bfloat16"))
        sp.add_argument("--eval-every", type=int, default=S, help="validate every N steps (pretrain 50, finetune "
                        "100; 0: only at the end)")
        sp.add_argument("--eval-batches", type=int, default=S, help="validation batches (pretrain 10; finetune: "
                        f"batches of {EVAL_BATCH} examples, 0 = the whole validation split)")
        sp.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (0: only at the end)")
        sp.add_argument("--log-every", type=int, default=S, help="metrics.jsonl line every N steps (10)")
        sp.add_argument("--threads", type=int, default=S, help="torch CPU threads (0: torch's default)")
        sp.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
        sp.add_argument("--config", default=None, help="YAML or TOML file with the same keys; flags override it")
        sp.add_argument("--stop-after", type=int, default=None, help=S)  # debug: act as if Ctrl-C after step N

    def pretraining(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", default=S, help="LLaMA size: " + ", ".join(PRESET_NAMES) + " (default tiny)")
        sp.add_argument("--dataset", default=S, help="shakespeare, bible, wiki, builtin, a .txt file or folder, "
                        "or a Hugging Face dataset name with --streaming (default shakespeare)")
        sp.add_argument("--streaming", action="store_true", default=S, help="stream a Hugging Face dataset")
        sp.add_argument("--seq-len", type=int, default=S, help="tokens per sequence (64)")
        sp.add_argument("--full-vocab", action="store_true", default=S,
                        help="keep GPT-2's 50,257 tokens (default: only those in the corpus)")

    def finetuning(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--task", default=S, help="rotten-tomatoes, review-ratings, trec, sms-spam, a CSV/TSV/JSONL "
                        "file with text and label columns, or glue/<name> (needs datasets and a network)")
        sp.add_argument("--model", default=S, help="minilm (all-MiniLM-L6-v2 from PyPI, default), a local folder, or "
                        "a Hugging Face name such as roberta-base (needs a network)")
        sp.add_argument("--max-length", type=int, default=S, help="tokens per example, longer ones are cut (128)")

    methods = "one of " + ", ".join(METHODS) + " (default galore)"
    resume = "a checkpoint file, or a run folder (its newest checkpoint)"
    def parallel(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 (default "
                        "DDP)")
        sp.add_argument("--shard-updates", action="store_true", help="under torchrun: compute each subspace update "
                        "on one rank and broadcast it")

    pre = sub.add_parser("pretrain", help="pretrain a LLaMA preset from scratch")
    pre.add_argument("--method", default=S, help=methods)
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
    cmp_ = sub.add_parser("compare", help="run several methods on identical data, seed and budget; write a report "
                          "(pretraining, or fine-tuning with --task)")
    cmp_.add_argument("--methods", default=None, help=f"comma-separated (default {DEFAULT_COMPARE})")
    shared(cmp_)
    pretraining(cmp_)
    finetuning(cmp_)
    return p


def read_config_file(path: str, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"config file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # noqa: BLE001 - any parser error is bad input
        raise UsageError(f"config file {file} does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {file} must hold a mapping of option names to values")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    allowed = set(defaults if defaults is not None else DEFAULTS) | {"methods"}
    unknown = sorted(set(out) - allowed)
    if unknown:
        raise UsageError(f"config file {file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return out


def explicit_options(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config-file values overridden by the flags actually given."""
    defaults = DEFAULTS if defaults is None else defaults
    given = read_config_file(args.config, defaults) if args.config else {}
    given.pop("methods", None)
    flags = {k: v for k, v in vars(args).items() if k in defaults}
    return {**given, **flags}


def max_rank(preset: str) -> int:
    from .train.models import PRESETS

    hidden, intermediate, _, _ = PRESETS[preset]
    return min(hidden, intermediate)


def _validate_shared(cfg: dict[str, Any], positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    """Checks common to pretraining and fine-tuning configs."""
    if cfg["method"] not in METHODS:
        raise UsageError(f"unknown method {cfg['method']!r}; choose one of {', '.join(METHODS)}")
    if cfg["dtype"] not in ("float32", "bfloat16"):
        raise UsageError(f"unknown dtype {cfg['dtype']!r}; choose float32 or bfloat16")
    for key in positive:
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UsageError(f"{key.replace('_', '-')} must be a positive integer, got {cfg[key]!r}")
    for key in non_negative:
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise UsageError(f"{key.replace('_', '-')} must be a non-negative integer, got {cfg[key]!r}")
    if METHODS[cfg["method"]] is None:
        for key in ("rank", "update_gap"):
            if cfg.get(key) is not None:
                raise UsageError(f"--{key.replace('_', '-')} does not apply to method adamw (full rank)")
    for key in ("rank", "update_gap"):
        if cfg.get(key) is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise UsageError(f"{key.replace('_', '-')} must be a positive integer, got {cfg[key]!r}")
    device = str(cfg["device"])
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available")
    elif device != "cpu" and not device.startswith("mps"):
        raise UsageError(f"unknown device {device!r}; use cpu or cuda[:N]")


def validate(cfg: dict[str, Any]) -> None:
    if cfg["preset"] not in PRESET_NAMES:
        raise UsageError(f"unknown preset {cfg['preset']!r}; choose one of {', '.join(PRESET_NAMES)}")
    _validate_shared(cfg, ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"),
                     ("eval_every", "save_every", "threads"))
    if cfg.get("rank") is not None:
        top = max_rank(cfg["preset"])
        if cfg["rank"] > top:
            raise UsageError(f"rank {cfg['rank']} does not fit preset {cfg['preset']}: the maximum allowed is {top} "
                             "(its smallest projected weight dimension)")
    if cfg["seq_len"] > 1024:
        raise UsageError(f"seq-len {cfg['seq_len']} exceeds the models' 1024 positions")


def validate_finetune(cfg: dict[str, Any]) -> None:
    _validate_shared(cfg, ("steps", "batch_size", "max_length", "grad_accum", "log_every"),
                     ("eval_every", "eval_batches", "save_every", "threads"))


def optimizer_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """lr and projection settings of a method: the preset's defaults, overridden by the config."""
    small = cfg["preset"] in ("tiny", "mini")
    projected = METHODS[cfg["method"]] is not None
    lr = cfg["lr"] if cfg.get("lr") is not None else (3e-3 if small else (1e-2 if projected else 1e-3))
    out: dict[str, Any] = {"lr": lr}
    if projected:
        rank, gap = PROJECTION_DEFAULTS[cfg["preset"]]
        out.update(rank=cfg.get("rank") or rank, update_proj_gap=cfg.get("update_gap") or gap, scale=cfg["scale"])
    return out


def finetune_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """lr and projection settings for fine-tuning: the same lr for every method, GaLore's rank 8 and scale 2."""
    out: dict[str, Any] = {"lr": cfg["lr"] if cfg.get("lr") is not None else FINETUNE_LR}
    if METHODS[cfg["method"]] is not None:
        rank, gap = FINETUNE_PROJECTION
        out.update(rank=cfg.get("rank") or rank, update_proj_gap=cfg.get("update_gap") or gap, scale=cfg["scale"])
    return out


# ---------------------------------------------------------------------------------------------- data
class HFStream:
    """Batches packed from a streamed Hugging Face dataset's ``text`` field (GPT-2 BPE); resumes by skipping.

    With a ``seed`` the rows come through ``IterableDataset.shuffle`` (a buffer of ``SHUFFLE_BUFFER`` rows, seed
    ``seed + epoch`` for each pass), so runs with different seeds see different orders; ``seed=None`` (the
    validation batches) keeps the dataset's order."""

    SHUFFLE_BUFFER = 10_000

    def __init__(self, name: str, split: str, batch_size: int, seq_len: int, tokenizer, seed: int | None = 0):
        try:
            import datasets
        except ImportError:
            raise UsageError(f"dataset {name!r} is a Hugging Face dataset: run `pip install datasets` (and it needs "
                             "network access to the Hugging Face hub)") from None
        self.name, self.split, self.batch_size, self.seq_len, self.tok = name, split, batch_size, seq_len, tokenizer
        self.step, self.epoch = 0, 0

        def rows():
            ds = datasets.load_dataset(name, split=split, streaming=True)
            if seed is not None:
                ds = ds.shuffle(seed=seed + self.epoch, buffer_size=self.SHUFFLE_BUFFER)
            return iter(ds)

        self._make = rows
        self._rows = self._make()
        self._buffer: list[int] = []

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        need = self.batch_size * self.seq_len
        while len(self._buffer) < need:
            try:
                row = next(self._rows)
            except StopIteration:
                self.epoch += 1
                self._rows = self._make()
                continue
            self._buffer.extend(self.tok(row.get("text", ""), add_special_tokens=False)["input_ids"] + [50256])
        ids = torch.tensor(self._buffer[:need], dtype=torch.long).view(self.batch_size, self.seq_len)
        del self._buffer[:need]
        self.step += 1
        return ids, ids.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for _ in range(int(state["step"])):
            next(self)


class Data:
    """The training stream factory and fixed validation batches of one config."""

    def __init__(self, cfg: dict[str, Any]):
        from .train.data import CORPORA, BatchStream, TokenDataset

        name = str(cfg["dataset"])
        self.cfg = cfg
        local = name in CORPORA or Path(name).expanduser().exists()
        if not local and not cfg.get("streaming"):
            raise UsageError(f"unknown dataset {name!r}: not one of {', '.join(CORPORA)} and no such file or folder "
                             "(for a Hugging Face dataset add --streaming)")
        self.hf = not local
        if self.hf:
            from .train import assets

            tok = assets.tokenizer()
            self.vocab_size = len(tok)
            self._tok = tok
            self.eval_batches = []
            try:
                val = HFStream(name, "validation", cfg["batch_size"], cfg["seq_len"], tok, seed=None)
                self.eval_batches = [next(val) for _ in range(cfg["eval_batches"])]
            except UsageError:
                raise
            except Exception as err:  # noqa: BLE001 - no validation split: train loss only
                print(f"gradspace: no validation batches from {name} ({type(err).__name__})", file=sys.stderr)
            self.info = f"streaming {name} (GPT-2 vocabulary)"
            return
        try:
            self.dataset = TokenDataset.from_corpus(name, compact=not cfg["full_vocab"])
        except ValueError as err:
            raise UsageError(str(err)) from None
        self._BatchStream = BatchStream
        self.vocab_size = self.dataset.vocab_size
        for split, n in (("train", self.dataset.train.numel()), ("val", self.dataset.val.numel())):
            if n < cfg["seq_len"]:
                raise UsageError(f"seq-len {cfg['seq_len']} does not fit the data: the {split} split of {name} has "
                                 f"only {n} tokens")
        self.eval_batches = self.dataset.fixed_batches("val", cfg["eval_batches"], cfg["batch_size"],
                                                       cfg["seq_len"], seed=1234)
        self.info = (f"{name}: {self.dataset.train.numel():,} train / {self.dataset.val.numel():,} validation "
                     f"tokens, vocabulary {self.vocab_size:,}")

    def stream(self):
        cfg = self.cfg
        if self.hf:
            return HFStream(str(cfg["dataset"]), "train", cfg["batch_size"], cfg["seq_len"], self._tok, cfg["seed"])
        return self._BatchStream(self.dataset, "train", cfg["batch_size"], cfg["seq_len"], seed=cfg["seed"])


# ---------------------------------------------------------------------------------------------- torchrun
class Parallel:
    """This process's place in a ``torchrun`` job. Without one (WORLD_SIZE unset or 1) it is a single process and
    every method is a no-op, so the training code has one path."""

    def __init__(self, fsdp: bool = False, shard_updates: bool = False, device: str = "cpu"):
        from .distributed import init_from_env

        if (fsdp or shard_updates) and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            flag = "--fsdp" if fsdp else "--shard-updates"
            raise UsageError(f"{flag} needs several processes: start the run with torchrun --nproc_per_node N")
        self.rank, self.world, self.device = init_from_env(device)
        self.strategy = "none" if self.world == 1 else "fsdp2" if fsdp else "ddp"
        self.distributed = "shard_updates" if shard_updates else None
        self.main = self.rank == 0

    def wrap(self, model, blocks) -> tuple[Any, Any]:
        """``(model to train, module whose parameters the optimizer gets)``. Under DDP that is ``model.module``,
        with the single-process parameter names, so target modules match and checkpoints are interchangeable."""
        from .distributed import wrap_model

        wrapped = wrap_model(model, self.strategy, blocks=blocks)
        return wrapped, model

    def _reduce(self, value: float, op) -> float:
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def all_ok(self, ok: bool) -> bool:
        import torch.distributed as dist

        return self._reduce(1.0 if ok else 0.0, dist.ReduceOp.MIN) > 0.0

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist

        return self._reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0.0

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.SUM) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Raise ``error`` here, or exit 2 quietly when another rank failed (it prints the one-line message); an
        error on one rank must not leave the others waiting in a collective."""
        if not self.all_ok(error is None):
            if error is not None:
                raise error
            raise SystemExit(2)

    def first(self, fn):
        """``fn()`` on rank 0, then on the others: caches (tokenised corpus, downloaded model) are filled once."""
        if self.world == 1:
            return fn()
        out, error = None, None
        if self.main:
            try:
                out = fn()
            except (UsageError, ValueError, OSError, RuntimeError) as err:
                error = err
        self.agree(error)
        return out if self.main else fn()

    def shard(self, stream) -> Any:
        return stream if self.world == 1 else RankStream(stream, self.rank, self.world)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


class RankStream:
    """Rank ``rank``'s part of a stream: of every ``world`` consecutive batches, the ``rank``-th. All ranks advance
    the same seeded stream, so the data position is the stream's own state (saved once, resumable), and ranks
    with batch B see together what one process with batch ``world * B`` sees."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(self.stream) for _ in range(self.world)]
        return batches[self.rank]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- training
class StopFlag:
    """First Ctrl-C: finish the current step, save, exit 130. Second Ctrl-C: abort at once."""

    def __init__(self, grace: float = 0.0):
        self.requested = False
        self.installed = False
        self._previous = None
        self.grace = grace  # torchrun forwards the terminal's Ctrl-C: a second SIGINT this soon is the same one
        self._when = 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._when < self.grace:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._when = time.monotonic()
        print("\ngradspace: interrupt received; stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def request(self) -> None:
        if self.installed:
            os.kill(os.getpid(), signal.SIGINT)
        self.requested = True

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - optional: tensorboard missing or broken
        return None
    try:
        return SummaryWriter(str(folder / "tensorboard"))
    except Exception:  # noqa: BLE001 - optional
        return None


def run_training(cfg: dict[str, Any], out: Path, *, command: str, model, optimizer, scheduler, stream,
                 evaluate_fn, settings: dict[str, Any], resume: dict | None = None, stop_after: int | None = None,
                 label: str | None = None, no_eval: dict[str, float] | None = None,
                 extra: dict[str, Any] | None = None, parallel: Parallel | None = None,
                 inner=None) -> dict[str, Any]:
    """The run machinery shared by ``pretrain`` and ``finetune``; returns the run's summary.

    Restores a checkpoint (model, optimizer, scheduler, data position, RNG), then creates the run folder (only now,
    so bad input leaves nothing behind), trains with metrics.jsonl lines, periodic ``evaluate_fn()`` and
    checkpoints, handles Ctrl-C (save, exit 130), and ends with a final evaluation, checkpoint and summary.json.

    Under torchrun (``parallel``; ``model`` wrapped, ``inner`` the unwrapped module) only rank 0 writes files and
    shows progress; see :meth:`_save_parallel` for checkpoints.
    """
    import torch
    from tqdm import tqdm

    from .train import checkpoint as ck
    from .train.loop import train

    parallel = parallel or Parallel()
    inner = model if inner is None else inner
    main = parallel.main
    device = next(model.parameters()).device
    start = 0
    if resume is not None:
        start = int(resume["step"])
        if start >= cfg["steps"]:
            raise UsageError(f"the checkpoint is at step {start}, the run has {cfg['steps']} steps: nothing to do "
                             "(give a larger --steps to continue)")
        error = None
        try:
            _load_parallel(resume, parallel, model, inner, optimizer)
            if resume.get("scheduler") is not None:
                scheduler.load_state_dict(resume["scheduler"])
            if resume.get("stream") is not None:
                stream.load_state_dict(resume["stream"])
        except ck.CheckpointError as err:
            error = err
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:200]
            error = ck.CheckpointError(f"checkpoint does not fit this run ({first})")
        parallel.agree(error)
        ck.set_rng_state(resume["rng"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        if start and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
        elif not start:
            metrics_path.write_text("")
    metrics = metrics_path.open("a") if main else open(os.devnull, "w")  # noqa: SIM115 - closed below
    writer = _tensorboard(out) if main else None
    evals: list[dict] = []

    def log(line: dict[str, Any]) -> None:
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
        if writer is not None:
            for k, v in line.items():
                if k not in ("step", "type") and isinstance(v, (int, float)):
                    writer.add_scalar(f"{line['type']}/{k}", v, line["step"])

    def do_eval(step: int) -> None:
        if evaluate_fn is None:
            return
        e = {"step": step, **evaluate_fn()}
        evals.append(e)
        log({"type": "eval", **e})

    def save(step: int) -> Path:
        return _save_parallel(ckpt_dir, step, parallel, model=model, inner=inner, optimizer=optimizer,
                              scheduler=scheduler, stream=stream, config=cfg)

    bar = tqdm(total=cfg["steps"], initial=start, desc=label or cfg["method"], unit="step", dynamic_ncols=True,
               file=sys.stderr, disable=not main)

    last: list[dict] = []

    def on_step_record(r: dict[str, Any]) -> None:
        if parallel.world > 1:  # the loss of the global batch, the tokens of all ranks
            r["loss"] = parallel.mean(r["loss"])
            r["tokens_per_s"] *= parallel.world
        last[:] = [r]
        if r["step"] % cfg["log_every"] == 0 or r["step"] == cfg["steps"]:
            log({"type": "train", "step": r["step"], "loss": r["loss"], "lr": r["lr"],
                 "tokens_per_s": r["tokens_per_s"], "step_time": r["step_time"], "grad_norm": r["grad_norm"]})

    with StopFlag(grace=2.0 if parallel.world > 1 else 0.0) as flag:
        def hook(step: int) -> bool:
            bar.update(step - bar.n)
            if last:
                bar.set_postfix(loss=f"{last[0]['loss']:.3f}", tok_s=f"{last[0]['tokens_per_s']:.0f}")
            if cfg["eval_every"] and step % cfg["eval_every"] == 0 and step != cfg["steps"]:
                do_eval(step)
            if cfg["save_every"] and step % cfg["save_every"] == 0 and step != cfg["steps"]:
                save(step)
            if stop_after is not None and step == stop_after:
                flag.request()
            return parallel.any(flag.requested)  # every rank stops at the same step

        try:
            result = train(model, optimizer, stream, cfg["steps"], scheduler=scheduler, start_step=start,
                           grad_accum=cfg["grad_accum"], grad_clip=cfg["grad_clip"], callback=on_step_record,
                           log_every=1, step_hook=hook)
        except KeyboardInterrupt:
            bar.close()
            metrics.close()
            raise UsageError("aborted by a second Ctrl-C without saving; resume from the last checkpoint with "
                             f"`gradspace {command} --resume {out}`") from None
        except FloatingPointError as err:
            bar.close()
            metrics.close()
            raise UsageError(str(err)) from None
    bar.close()
    if result["stopped_at"] is not None:
        path = save(result["stopped_at"])
        metrics.close()
        if main:
            print(f"gradspace: interrupted at step {result['stopped_at']} of {cfg['steps']}; checkpoint saved to "
                  f"{path}\nresume with: gradspace {command} --resume {out}", file=sys.stderr, flush=True)
        parallel.barrier()  # torchrun stops the other ranks when one exits: rank 0 has said everything by now
        raise SystemExit(130)
    do_eval(cfg["steps"])
    save(cfg["steps"])
    metrics.close()
    if writer is not None:
        writer.close()
    diag = optimizer.diagnostics()
    final = {k: v for k, v in evals[-1].items() if k != "step"} if evals else dict(no_eval or {})
    summary = {
        "method": cfg["method"],
        "steps": cfg["steps"],
        "start_step": start,
        "train_loss": result["train_loss"],
        "final_loss": result["history"][-1]["loss"],
        **final,
        "wall_time": result["wall_time"],
        "tokens_per_s": result["tokens_per_s"],
        "update_seconds": diag["update_seconds"],
        "state_bytes": diag["state_bytes"],
        "peak_memory": _peak_memory(device),
        "history": [{"step": r["step"], "loss": r["loss"]} for r in result["history"]],
        "evals": evals,
        "weights": {name: {"rank": w["rank"], "energy": w["energy"], "updates": w["updates"],
                           "state_bytes": w["state_bytes"]} for name, w in diag["weights"].items()},
        **settings,
        **(extra or {}),
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _save_parallel(folder: Path, step: int, parallel: Parallel, *, model, inner, optimizer, scheduler, stream,
                   config: dict[str, Any]) -> Path:
    """Rank 0 writes ``ckpt-<step>.pt`` with the unwrapped model's full state dict, so one process can resume a
    torchrun run and the other way round. DDP's optimizer state is the same on every rank: rank 0's is saved.
    FSDP2's is per rank: each other rank writes ``ckpt-<step>.rank<r>.pt`` first, and rank 0 writes its main file
    only after a barrier, so a main file that exists is a complete checkpoint."""
    from .train import checkpoint as ck

    state = None
    if parallel.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        part = _local_optimizer_state(optimizer)
        if not parallel.main:
            ck.save_shard(folder, step, parallel.rank, {"step": step, **part})
        parallel.barrier()
    else:
        part = {"optimizer": optimizer.state_dict()}
    if parallel.main:
        ck.save_checkpoint(folder, step, model=inner, optimizer=None, scheduler=scheduler, stream=stream,
                           config=config, model_state=state,
                           extra={**part, "world_size": parallel.world, "strategy": parallel.strategy})
    parallel.barrier()
    return ck.checkpoint_path(folder, step)


def _local_optimizer_state(optimizer) -> dict[str, Any]:
    """FSDP2: the optimizer state with its DTensors (moments of unprojected weights) as this rank's local tensors,
    which load with ``weights_only=True`` and without a device mesh; ``dtensor_keys`` says where to re-wrap them."""
    from .distributed import is_dtensor

    sd = optimizer.state_dict()
    keys = [[i, k] for i, s in sd["state"].items() for k, v in s.items() if is_dtensor(v)]
    sd["state"] = {i: {k: v.to_local() if is_dtensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {"optimizer": sd, "dtensor_keys": keys}


def _load_parallel(resume: dict, parallel: Parallel, model, inner, optimizer) -> None:
    """The model and optimizer state of ``resume``. FSDP2 checkpoints need the same strategy and world size (each
    rank's optimizer state fits its own shard); DDP and single-process checkpoints load into each other."""
    from .train import checkpoint as ck

    saved_world, saved = int(resume.get("world_size", 1)), resume.get("strategy", "none")
    if (saved == "fsdp2" or parallel.strategy == "fsdp2") and (saved, saved_world) != (parallel.strategy,
                                                                                        parallel.world):
        how = (f"with torchrun --nproc_per_node {saved_world} ... --fsdp" if saved == "fsdp2"
               else "without --fsdp (with DDP or in one process)")
        raise ck.CheckpointError(f"checkpoint {resume.get('path', '')} was written by {saved_world} process(es) "
                                 f"with {saved}; resume it {how}")
    if parallel.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.tensor import DTensor

        set_model_state_dict(model, resume["model"], options=StateDictOptions(full_state_dict=True))
        part = resume if parallel.main else ck.load_shard(Path(resume["path"]), parallel.rank)
        sd = part["optimizer"]
        params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict's numbering
        for index, key in part.get("dtensor_keys", []):
            p, state = params[index], sd["state"][index]
            state[key] = DTensor.from_local(state[key].to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride())
        optimizer.load_state_dict(sd)
    else:
        inner.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])


def _make_optimizer(cfg: dict[str, Any], model, settings: dict[str, Any], **extra):
    from . import create_optimizer

    try:
        return create_optimizer(cfg["method"], model, base=cfg["base"], weight_decay=0.0, **settings, **extra)
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_pretrain(cfg: dict[str, Any], out: Path, *, data: Data | None = None, resume: dict | None = None,
                 stop_after: int | None = None, label: str | None = None,
                 parallel: Parallel | None = None) -> dict[str, Any]:
    """Train one run into ``out`` (created only once everything is set up); returns its summary."""
    import torch

    from .train.loop import evaluate, warmup_cosine
    from .train.models import build_llama

    validate(cfg)
    parallel, device, dtype = _placement(cfg, parallel)
    data = data or Data(cfg)
    stream = parallel.shard(data.stream())
    torch.manual_seed(cfg["seed"])
    model = build_llama(cfg["preset"], vocab_size=data.vocab_size).to(device=device, dtype=dtype)
    model, inner = parallel.wrap(model, blocks=model.model.layers)
    settings = optimizer_settings(cfg)
    optimizer = _make_optimizer(cfg, inner, settings, **_distributed_option(parallel))
    evaluate_fn = (lambda: evaluate(model, data.eval_batches)) if data.eval_batches else None
    return run_training(cfg, out, command="pretrain", model=model, optimizer=optimizer,
                        scheduler=warmup_cosine(optimizer, cfg["steps"]), stream=stream, evaluate_fn=evaluate_fn,
                        settings=settings, resume=resume, stop_after=stop_after, label=label,
                        no_eval={"val_loss": float("nan"), "val_ppl": float("nan")}, parallel=parallel, inner=inner)


def _placement(cfg: dict[str, Any], parallel: Parallel | None):
    """Threads, process layout, device and dtype of a run (torchrun ranks use their own device)."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    parallel = parallel or Parallel()
    device = torch.device(cfg["device"]) if parallel.world == 1 else parallel.device
    return parallel, device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["dtype"]]


def _distributed_option(parallel: Parallel) -> dict[str, Any]:
    return {"distributed": parallel.distributed} if parallel.distributed else {}


class FinetuneSetup:
    """Task, tokenizer and model of a fine-tuning config, checked against each other (rank, max length)."""

    def __init__(self, cfg: dict[str, Any]):
        import torch

        from .train.encoder import load_encoder, max_rank, projection_targets
        from .train.tasks import load_task

        validate_finetune(cfg)
        try:
            self.task = load_task(cfg["task"])
            torch.manual_seed(cfg["seed"])  # the new classification head
            self.model, self.tokenizer = load_encoder(str(cfg["model"]), self.task.num_labels, self.task.regression)
            self.targets = projection_targets(self.model)
        except ValueError as err:
            raise UsageError(str(err)) from None
        top = max_rank(self.model, self.targets)
        if METHODS[cfg["method"]] is not None and cfg.get("rank") is not None and cfg["rank"] > top:
            raise UsageError(f"rank {cfg['rank']} does not fit model {cfg['model']}: the maximum allowed is {top} "
                             "(its smallest projected weight dimension)")
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        limit = min(positions, getattr(self.tokenizer, "model_max_length", positions) or positions)
        if cfg["max_length"] > limit:
            raise UsageError(f"max-length {cfg['max_length']} exceeds model {cfg['model']}'s {limit} positions")
        t = self.task
        kind = "regression" if t.regression else f"{t.num_labels} classes"
        self.info = (f"{t.name}: {len(t.train):,} train / {len(t.validation):,} validation examples, {kind}, "
                     f"metric {t.metric}")


def run_finetune(cfg: dict[str, Any], out: Path, *, setup: FinetuneSetup | None = None, resume: dict | None = None,
                 stop_after: int | None = None, label: str | None = None,
                 parallel: Parallel | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg["model"]`` on ``cfg["task"]`` into ``out``; returns the summary (with the final metrics)."""
    import torch

    from .train.encoder import evaluate_task
    from .train.loop import warmup_cosine
    from .train.tasks import ExampleStream, collate_fn, eval_batches

    validate_finetune(cfg)
    parallel, device, dtype = _placement(cfg, parallel)
    setup = setup or FinetuneSetup(cfg)
    task = setup.task
    model = setup.model.to(device=device, dtype=dtype)
    model, inner = parallel.wrap(model, blocks=model.bert.encoder.layer if hasattr(model, "bert") else ())
    settings = finetune_settings(cfg)
    optimizer = _make_optimizer(cfg, inner, settings, target_modules=setup.targets, **_distributed_option(parallel))
    collate = collate_fn(setup.tokenizer, cfg["max_length"], dtype if task.regression else torch.long)
    stream = parallel.shard(ExampleStream(task.train, collate, cfg["batch_size"], seed=cfg["seed"]))
    batches = eval_batches(task.validation, collate, EVAL_BATCH, cfg["eval_batches"] * EVAL_BATCH)
    return run_training(cfg, out, command="finetune", model=model, optimizer=optimizer,
                        scheduler=warmup_cosine(optimizer, cfg["steps"]), stream=stream,
                        evaluate_fn=lambda: evaluate_task(model, batches, task.num_labels, task.regression),
                        settings=settings, resume=resume, stop_after=stop_after, label=label,
                        extra={"task": task.name, "model": cfg["model"], "metric": task.metric}, parallel=parallel,
                        inner=inner)


def _default_out(name: str | None = None) -> Path:
    return Path("runs") / (name or time.strftime("%Y%m%d-%H%M%S"))


def _resolve_run(args: argparse.Namespace, command: str, defaults: dict[str, Any], identity: tuple[str, ...],
                 name) -> tuple[dict[str, Any], Path, dict | None]:
    """``(config, run folder, checkpoint or None)`` from the flags, the config file and ``--resume``."""
    from .train import checkpoint as ck

    explicit = explicit_options(args, defaults)
    if not args.resume:
        cfg = {**defaults, **explicit}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cfg, Path(args.out) if args.out else _default_out(f"{name(cfg)}-{stamp}"), None
    path = ck.find_checkpoint(args.resume)
    resume = ck.load_checkpoint(path)
    resume["path"] = str(path)
    saved = resume["config"]
    if ("task" in saved) != (command == "finetune"):
        other = "finetune" if "task" in saved else "pretrain"
        raise ck.CheckpointError(f"checkpoint {path} is from `gradspace {other}`; resume it with that command")
    for key in identity:
        if key in explicit and key in saved and explicit[key] != saved[key]:
            raise ck.CheckpointError(f"checkpoint {path} was saved with {key}={saved[key]!r} but this run asks "
                                     f"for {key}={explicit[key]!r}")
    cfg = {**defaults, **saved, **explicit}
    out = Path(args.out) if args.out else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    return cfg, out, resume


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg, out, resume = _resolve_run(args, "pretrain", DEFAULTS, IDENTITY, lambda c: f"{c['preset']}-{c['method']}")
    validate(cfg)
    parallel = Parallel(args.fsdp, args.shard_updates, cfg["device"])
    try:
        data = parallel.first(lambda: Data(cfg))
        if parallel.main:
            print(f"gradspace pretrain: llama-{cfg['preset']}, {cfg['method']} ({cfg['base']}), {data.info}; run "
                  f"folder {out}" + (f"; resuming at step {resume['step']}" if resume else "") + _ranks(parallel),
                  file=sys.stderr)
        s = run_pretrain(cfg, out, data=data, resume=resume, stop_after=args.stop_after, parallel=parallel)
    finally:
        parallel.close()
    if parallel.main:
        print(f"done: {s['steps']} steps, final train loss {s['final_loss']:.4f}, val loss {s['val_loss']:.4f} "
              f"(ppl {s['val_ppl']:.2f}), {s['wall_time']:.1f}s; metrics in {out / 'metrics.jsonl'}")
    return 0


def _ranks(parallel: Parallel) -> str:
    return f"; {parallel.world} processes, {parallel.strategy}" if parallel.world > 1 else ""


def _task_slug(task: str) -> str:
    return Path(str(task)).stem.replace("/", "-")


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg, out, resume = _resolve_run(args, "finetune", FINETUNE_DEFAULTS, FINETUNE_IDENTITY,
                                    lambda c: f"{_task_slug(c['task'])}-{c['method']}")
    validate_finetune(cfg)
    parallel = Parallel(args.fsdp, args.shard_updates, cfg["device"])
    try:
        setup = parallel.first(lambda: FinetuneSetup(cfg))
        if parallel.main:
            print(f"gradspace finetune: {cfg['model']}, {cfg['method']} ({cfg['base']}), {setup.info}; run folder "
                  f"{out}" + (f"; resuming at step {resume['step']}" if resume else "") + _ranks(parallel),
                  file=sys.stderr)
        s = run_finetune(cfg, out, setup=setup, resume=resume, stop_after=args.stop_after, parallel=parallel)
    finally:
        parallel.close()
    if parallel.main:
        print(f"done: {s['steps']} steps, final train loss {s['final_loss']:.4f}, validation {s['metric']} "
              f"{s[s['metric']]:.4f} (loss {s['val_loss']:.4f}), {s['wall_time']:.1f}s; results in "
              f"{out / 'summary.json'}")
    return 0


class _ChildHandlesInterrupt:
    """While a compare child runs, Ctrl-C is the child's to handle (it saves and exits 130); the parent waits."""

    def __enter__(self):
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self._previous = signal.signal(signal.SIGINT, lambda *_: None)
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _run_child(command: str, cfg: dict[str, Any], out: Path, stop_after: int | None) -> dict[str, Any]:
    """``python -m gradspace <command>`` in a fresh process, so its peak memory is its own; returns its summary."""
    src = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"  # JSON is YAML: read back by --config
        config.write_text(json.dumps(cfg))
        argv = [sys.executable, "-m", "gradspace", command, "--config", str(config), "--out", str(out)]
        if stop_after is not None:
            argv += ["--stop-after", str(stop_after)]
        with _ChildHandlesInterrupt():
            code = subprocess.run(argv, env=env, check=False).returncode
    if code == 130:
        print(f"gradspace: compare stopped during {cfg['method']}; no report written", file=sys.stderr)
        raise SystemExit(130)
    if code != 0:
        raise SystemExit(code)  # the child has printed its one-line error
    return json.loads((out / "summary.json").read_text())


def run_compare(cfg: dict[str, Any], methods: list[str], out: Path, stop_after: int | None = None) -> dict:
    """Every method on the same data, seed and budget, each in its own process and subfolder; then the report."""
    from .train.report import text_table, write_report

    finetune = "task" in cfg
    runs = {m: {**cfg, "method": m, **({"rank": None, "update_gap": None} if METHODS[m] is None else {})}
            for m in methods}
    for run_cfg in runs.values():
        (validate_finetune if finetune else validate)(run_cfg)
    if finetune:  # prepares the task and model caches once, and checks rank and length before any run starts
        setup = FinetuneSetup(runs[methods[-1]])
        what = f"fine-tuning {cfg['model']} on {setup.info}"
    else:
        what = f"llama-{cfg['preset']}, {Data(runs[methods[0]]).info}"
    print(f"gradspace compare: {', '.join(methods)}; {what}; report in {out}", file=sys.stderr)
    results = {m: _run_child("finetune" if finetune else "pretrain", runs[m], out / m, stop_after) for m in methods}
    write_report(out, results, {**cfg, "methods": methods})
    print(f"\n{text_table(results)}\n\nreport: {out / 'report.md'}")
    return results


def cmd_compare(args: argparse.Namespace) -> int:
    file_cfg = read_config_file(args.config, {**DEFAULTS, **FINETUNE_DEFAULTS}) if args.config else {}
    finetune = "task" in vars(args) or "task" in file_cfg
    defaults = FINETUNE_DEFAULTS if finetune else DEFAULTS
    other = sorted(k for k in {*vars(args), *file_cfg} if k in {*DEFAULTS, *FINETUNE_DEFAULTS} - set(defaults))
    if other:
        mode = "fine-tuning (--task)" if finetune else "pretraining (no --task)"
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in other)} do(es) not apply to comparing "
                         f"{mode}")
    explicit = explicit_options(args, defaults)
    methods_arg = args.methods if args.methods is not None else file_cfg.get("methods", DEFAULT_COMPARE)
    if isinstance(methods_arg, str):
        methods = [m.strip().lower() for m in methods_arg.split(",") if m.strip()]
    else:
        methods = [str(m).lower() for m in methods_arg]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    cfg = {**defaults, **explicit}
    out = Path(args.out) if args.out else _default_out(f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    run_compare(cfg, methods, out, stop_after=args.stop_after)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train.checkpoint import CheckpointError

    commands = {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "compare": cmd_compare}
    try:
        return commands[args.command](args)
    except (UsageError, CheckpointError) as err:
        parser.exit(2, f"gradspace: error: {err}\n")
    except KeyboardInterrupt:  # before training started: nothing to save
        parser.exit(130, "gradspace: interrupted before training started; nothing was saved\n")
    except (ValueError, RuntimeError, OSError) as err:
        msg = str(err).strip().splitlines()
        parser.exit(1, f"gradspace: error: {msg[0] if msg else type(err).__name__}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
