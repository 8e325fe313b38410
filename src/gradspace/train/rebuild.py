"""``gradspace export RUN``: the model of a run's newest good checkpoint (or of a checkpoint file), rebuilt and
written to ``RUN/model`` without training: after a run stopped while exporting, or to export an earlier step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import checkpoint as ck
from .runfolder import RunLock, folder_of, remove_orphans

#: ``gradspace export``'s flags
EXPORT_FLAGS = [
    (["run"], {"help": "a run folder (its newest checkpoint that loads) or a checkpoint file (its step)"}),
    (["--threads"], {"type": int, "default": 0}),
    (["--overwrite"], {"action": "store_true", "help": "replace a model folder of a later step"}),
    (
        ["--lora-rank"],
        {
            "default": None,
            "help": "also write RUN/adapter: the change from the starting model as a peft LoRA adapter, of this rank "
            "or 'auto' (per weight, the smallest rank keeping --lora-energy of the change)",
        },
    ),
    (["--lora-energy"], {"type": float, "default": 0.9, "help": "share of each weight's change kept by 'auto' (0.9)"}),
]


def export_run(
    path: str | Path, overwrite: bool = False, lora_rank: str | None = None, lora_energy: float = 0.9
) -> tuple[Path, int, str | None]:
    """Write the model of ``path`` (a run folder: its newest checkpoint that loads; or a checkpoint file) into its
    run folder's ``model/``, replacing the folder whole; returns ``(model folder, step, adapter report)``. The
    model of a later step is replaced only with ``overwrite`` (exporting an earlier checkpoint is a choice, not a
    repair). ``lora_rank`` (a rank or ``"auto"``) also writes ``RUN/adapter`` (``gradspace.train.lora_export``)."""
    from .errors import UsageError
    from .export import exported_step

    _check_lora(lora_rank, lora_energy)
    path = Path(path).expanduser()
    run = folder_of(ck.find_checkpoint(path))
    with RunLock(run):
        resume = ck.load_newest_good(path)
        step, cfg = int(resume["step"]), resume["config"]
        for orphan in remove_orphans(run):
            print(f"gradspace: removed {orphan}, left by a write that did not finish", file=sys.stderr)
        held = exported_step(run)
        if held is not None and held > step and not overwrite:
            raise UsageError(
                f"{run / 'model'} holds the model of step {held}, later than this checkpoint's step {step}; add "
                "--overwrite to replace it"
            )
        state = _model_state(resume)
        build = _finetuned if "task" in cfg else _causal_lm
        if lora_rank is not None:
            _starting_model(cfg)  # refused before anything is written
        folder, model = build(run, cfg, state, step)
        if lora_rank is None:
            return folder, step, None
        return folder, step, _adapter(run, cfg, model, lora_rank, lora_energy)


def _check_lora(rank: str | None, energy: float) -> None:
    from .errors import UsageError

    if rank is not None and rank != "auto" and not (str(rank).isdigit() and int(rank) >= 1):
        raise UsageError(f"--lora-rank must be a positive integer or 'auto', got {rank!r}")
    if not 0.0 < energy <= 1.0:
        raise UsageError(f"--lora-energy must be in (0, 1], got {energy!r}")


def _starting_model(cfg: dict[str, Any]):
    """The model the run started from, as a user loads it (its --model folder, or the encoder with the seeded
    head); a preset trained from scratch has none on disk."""
    from .errors import UsageError

    if "task" in cfg:
        from .config import FINETUNE

        setup = _setup({**FINETUNE.defaults, **cfg})
        return setup.model, setup.targets
    if not cfg.get("model"):
        raise UsageError(
            "--lora-rank writes an adapter for the model a run started from; this run trained a preset from scratch "
            "(no starting model on disk): use it with finetune runs or pretrain --model runs"
        )
    from .config import PRETRAIN
    from .recipes import _causal_lm as build
    from .streams import Data

    cfg = {**PRETRAIN.defaults, **cfg}
    return build(cfg, Data(cfg, 1).vocab_size), None


def _adapter(run: Path, cfg: dict[str, Any], model, rank: str, energy: float) -> str:
    from ..baselines.base import adapted_modules
    from .atomic import atomic_folder
    from .lora_export import describe, write_adapter

    start, targets = _starting_model(cfg)
    start = start.float()
    names = adapted_modules(start, cfg.get("target_modules") or targets)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    with atomic_folder(run / "adapter", "adapter folder") as tmp:
        summary = write_adapter(tmp, start, model.float(), names, rank, energy)
    return f"{describe(summary, model_bytes)}; written to {run / 'adapter'}"


def _model_state(resume: dict[str, Any]) -> dict[str, Any]:
    if resume.get("dcp"):  # FSDP2: the shards, read whole in this one process
        from .sharded import full_state

        return full_state(Path(resume["path"]))
    return resume["model"]


def _load(model, state: dict[str, Any], path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise ck.CheckpointError(f"checkpoint of {path} does not fit the model its config builds ({first})") from None


def _causal_lm(run: Path, cfg: dict[str, Any], state: dict[str, Any], step: int) -> Path:

    from .config import PRETRAIN
    from .export import export_causal_lm
    from .precision import store_weights
    from .recipes import _causal_lm as build
    from .recipes import baseline_export, prepare_baseline
    from .streams import Data

    cfg = {**PRETRAIN.defaults, **cfg}
    data = Data(cfg, 1)  # the vocabulary the run trained with: the export's tokenizer
    model = build({**cfg, "fresh": True}, data.vocab_size)  # the checkpoint's weights replace the folder's
    model = prepare_baseline(cfg, store_weights(model, cfg), PRETRAIN.settings(cfg), None, PRETRAIN)
    _load(model, state, run)
    dataset, tokenizer = getattr(data, "dataset", None), getattr(data, "_tok", None)
    written = {}

    def write(m, s):
        written["model"] = m  # a baseline's model merged: the plain model the folder holds
        return export_causal_lm(run, m, dataset, tokenizer, step=s)

    return baseline_export(cfg, run, write, adapter=bool(cfg.get("model")))(model, step), written["model"]


def _setup(cfg: dict[str, Any]):
    """A fine-tuning run's model as it started: an instruction-tuned run's without reading its data again."""
    from .recipes import finetune_setup
    from .sft import SFTSetup

    return SFTSetup.model_only(cfg) if cfg.get("objective") == "sft" else finetune_setup(cfg)


def _finetuned(run: Path, cfg: dict[str, Any], state: dict[str, Any], step: int) -> Path:
    """A fine-tuned classifier, or an instruction-tuned causal LM (with its chat template), from its checkpoint."""
    from .config import FINETUNE
    from .export import export_causal_lm, export_classifier
    from .precision import store_weights
    from .recipes import baseline_export, prepare_baseline, with_chat_template
    from .sft import SFTSetup

    cfg = {**FINETUNE.defaults, **cfg}
    setup = _setup(cfg)
    model = store_weights(setup.model, cfg, setup.targets)
    model = prepare_baseline(cfg, model, FINETUNE.settings(cfg), setup.targets, FINETUNE)
    _load(model, state, run)
    written = {}

    def write(m, s):
        written["model"] = m
        if isinstance(setup, SFTSetup):
            return export_causal_lm(run, m, None, with_chat_template(setup), step=s)
        return export_classifier(run, m, setup.tokenizer, step=s, labels=setup.task.labels)

    return baseline_export(cfg, run, write)(model, step), written["model"]
