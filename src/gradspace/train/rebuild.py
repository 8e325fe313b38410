"""``gradspace export RUN``: the model of a run's newest good checkpoint (or of a checkpoint file), rebuilt and
written to ``RUN/model`` without training: after a run stopped while exporting, or to export an earlier step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import checkpoint as ck
from .runfolder import RunLock, folder_of, remove_orphans


def export_run(path: str | Path, overwrite: bool = False) -> tuple[Path, int]:
    """Write the model of ``path`` (a run folder: its newest checkpoint that loads; or a checkpoint file) into its
    run folder's ``model/``, replacing the folder whole; returns ``(model folder, step)``. The model of a later
    step is replaced only with ``overwrite`` (exporting an earlier checkpoint is a choice, not a repair)."""
    from .errors import UsageError
    from .export import exported_step

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
        if "task" in cfg:
            return _classifier(run, cfg, state, step), step
        return _causal_lm(run, cfg, state, step), step


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
    write = baseline_export(
        cfg, run, lambda m, s: export_causal_lm(run, m, dataset, tokenizer, step=s), adapter=bool(cfg.get("model"))
    )
    return write(model, step)


def _classifier(run: Path, cfg: dict[str, Any], state: dict[str, Any], step: int) -> Path:

    from .config import FINETUNE
    from .encoder import FinetuneSetup
    from .export import export_classifier
    from .precision import store_weights
    from .recipes import baseline_export, prepare_baseline

    cfg = {**FINETUNE.defaults, **cfg}
    setup = FinetuneSetup(cfg)
    model = store_weights(setup.model, cfg, setup.targets)
    model = prepare_baseline(cfg, model, FINETUNE.settings(cfg), setup.targets, FINETUNE)
    _load(model, state, run)
    labels = setup.task.labels
    write = baseline_export(cfg, run, lambda m, s: export_classifier(run, m, setup.tokenizer, step=s, labels=labels))
    return write(model, step)
