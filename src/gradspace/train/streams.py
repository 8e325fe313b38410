"""The training streams of a run config: built-in corpora and local files (``TokenDataset``), or a streamed
Hugging Face dataset (``HFStream``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import UsageError


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
            raise UsageError(
                f"dataset {name!r} is a Hugging Face dataset: run `pip install datasets` (and it needs "
                "network access to the Hugging Face hub)"
            ) from None
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


#: files that make a folder a tokenizer folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def tokenizer_choice(cfg: dict[str, Any]) -> tuple[str, str]:
    """``(tokenizer, which and why, in words)``: ``--tokenizer PATH``, else the ``--model`` folder's own, else
    GPT-2's (full vocabulary)."""
    tok = cfg.get("tokenizer") or "gpt2"
    model = Path(str(cfg["model"])).expanduser() if cfg.get("model") else None
    if tok == "chars":
        return tok, "the corpus's characters (--tokenizer chars)"
    if tok != "gpt2":
        return tok, f"the tokenizer of {tok} (--tokenizer)"
    if model is None:
        return tok, "GPT-2's tokenizer"
    if model.is_dir() and any((model / f).exists() for f in TOKENIZER_FILES):
        return str(model), f"the tokenizer of {model} (its own)"
    why = f"{model} has no tokenizer files ({', '.join(TOKENIZER_FILES)})" if model.is_dir() else "--model is a file"
    return tok, f"GPT-2's tokenizer, since {why}; --tokenizer FOLDER gives another"


def user_tokenizer(cfg: dict[str, Any]):
    """The tokenizer of :func:`tokenizer_choice`. A folder's broken ``config.json`` (which transformers reads to
    find the tokenizer's class) is reported as itself, not as a tokenizer that does not load."""
    from transformers import AutoTokenizer

    from . import assets
    from .modelfolder import read_config

    tok = tokenizer_choice(cfg)[0]
    if tok == "gpt2":
        return assets.tokenizer()
    folder = Path(tok).expanduser()
    read_config(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise UsageError(f"tokenizer {tok} does not load ({str(err).splitlines()[0][:160]})") from None


class Data:
    """The training stream factory and fixed validation batches of one config. Under torchrun (``world``
    processes) the validation batches have the global batch size, each rank evaluating its rows of them, so that
    a run's validation set does not depend on how many processes run it (a run resumed on another number of
    processes keeps its curve)."""

    def __init__(self, cfg: dict[str, Any], world: int = 1):
        from .data import CORPORA, BatchStream, TokenDataset

        name = str(cfg["dataset"])
        self.cfg = cfg
        batch = cfg["batch_size"] * world
        local = name in CORPORA or Path(name).expanduser().exists()
        if not local and not cfg.get("streaming"):
            raise UsageError(
                f"unknown dataset {name!r}: not one of {', '.join(CORPORA)} and no such file or folder "
                "(for a Hugging Face dataset add --streaming)"
            )
        self.hf = not local
        if self.hf:
            from . import assets

            tok = assets.tokenizer()
            self.vocab_size = len(tok)
            self._tok = tok
            self.eval_batches = []
            try:
                val = HFStream(name, "validation", batch, cfg["seq_len"], tok, seed=None)
                self.eval_batches = [next(val) for _ in range(cfg["eval_batches"])]
            except UsageError:
                raise
            except Exception as err:
                print(f"gradspace: no validation batches from {name} ({type(err).__name__})", file=sys.stderr)
            self.info = f"streaming {name} (GPT-2 vocabulary)"
            return
        self._tok = None
        try:
            held_out = cfg.get("eval_dataset")
            if cfg.get("tokenizer", "gpt2") == "chars":
                self.dataset = TokenDataset.from_chars(name, eval_corpus=held_out)
            elif cfg.get("tokenizer", "gpt2") != "gpt2" or cfg.get("model"):
                # a local tokenizer, or a pretrained model's: its whole vocabulary (a pretrained embedding cannot
                # be compacted)
                self._tok = user_tokenizer(cfg)
                self.dataset = TokenDataset.from_corpus(name, tokenizer=self._tok, compact=False, eval_corpus=held_out)
            else:
                self.dataset = TokenDataset.from_corpus(name, compact=not cfg["full_vocab"], eval_corpus=held_out)
        except ValueError as err:
            raise UsageError(str(err)) from None
        self._BatchStream = BatchStream
        self.vocab_size = self.dataset.vocab_size
        for split, n in (("train", self.dataset.train.numel()), ("val", self.dataset.val.numel())):
            if n < cfg["seq_len"]:
                raise UsageError(
                    f"seq-len {cfg['seq_len']} does not fit the data: the {split} split of {name} has only {n} tokens"
                )
        try:
            self.eval_batches = (
                self.dataset.fixed_batches("val", cfg["eval_batches"], batch, cfg["seq_len"], seed=1234)
                if cfg["eval_batches"]
                else self.dataset.whole_split("val", batch, cfg["seq_len"])
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.info = (
            f"{name}: {self.dataset.train.numel():,} train / {self.dataset.val.numel():,} validation "
            f"tokens, vocabulary {self.vocab_size:,}"
        )

    def stream(self, batch_size: int | None = None):
        """The training batches (``batch_size``: the run's own by default; under torchrun the global batch)."""
        cfg = self.cfg
        batch = batch_size or cfg["batch_size"]
        if self.hf:
            return HFStream(str(cfg["dataset"]), "train", batch, cfg["seq_len"], self._tok, cfg["seed"])
        return self._BatchStream(self.dataset, "train", batch, cfg["seq_len"], seed=cfg["seed"])
