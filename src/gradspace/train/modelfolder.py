"""A Hugging Face model folder's own files, checked before ``from_pretrained`` reads them: a broken
``config.json`` or a truncated ``*.safetensors`` is a one-line error naming the file, where transformers raises a
traceback from deep inside (or blames the tokenizer, which reads ``config.json`` to find its class)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from .errors import UsageError


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' load report and weight-loading bar (the fresh head is expected, and said once)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def read_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` (``None`` when it has none); one that is not a JSON object is a UsageError."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): fix it or re-export "
            "the model"
        ) from None
    except (UnicodeDecodeError, OSError) as err:
        raise UsageError(f"{path} does not read ({err}): fix it or re-export the model") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} holds a JSON {type(config).__name__}, not a model config (an object)")
    return config


def check_weights(folder: Path) -> None:
    """Every ``*.safetensors`` of the folder opens (its header is whole and its tensors lie within the file):
    safetensors says only "incomplete metadata", without the file, from inside ``from_pretrained``."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError derives from Exception only
            why = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise UsageError(f"{path} is truncated or corrupt ({why}): re-download or re-export it") from None
