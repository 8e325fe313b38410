"""Token data for pretraining runs: a corpus tokenised once and cached, a train/validation split by position, and
batches of random (or consecutive) windows drawn from a ``torch.Generator`` so runs repeat and resume exactly.

    data = TokenDataset.from_corpus("shakespeare", compact=True)
    stream = BatchStream(data, "train", batch_size=8, seq_len=64, seed=0)
    input_ids, labels = next(stream)          # labels == input_ids: LlamaForCausalLM shifts them itself
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import assets

NAMED_CORPORA: dict[str, Callable[[], str]] = {
    "shakespeare": assets.shakespeare_text,
    "bible": assets.bible_text,
    "wiki": assets.wiki_text,
}
CORPORA = (*NAMED_CORPORA, "builtin")
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val"}


def load_corpus(name: str | Path = "shakespeare") -> str:
    """Text of a named corpus (shakespeare, bible, wiki, builtin = all three), a .txt file or a folder of them."""
    key = str(name)
    if key in NAMED_CORPORA:
        return NAMED_CORPORA[key]()
    if key == "builtin":
        return "\n\n".join(NAMED_CORPORA[n]() for n in NAMED_CORPORA)
    path = Path(key).expanduser()
    if path.is_file():
        return assets.read_text(path, "corpus file")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"corpus folder {path} holds no .txt files")
        return "\n\n".join(assets.read_text(f, "corpus file") for f in files)
    raise ValueError(
        f"unknown corpus {key!r}: choose one of {', '.join(CORPORA)}, or give a .txt file or a folder of .txt files"
    )


#: file-name stems of a corpus folder's held-out part
HELD_OUT_NAMES = ("valid", "validation", "val", "test", "dev")


def held_out_parts(name: str | Path, eval_corpus: str | Path | None = None) -> tuple[list, list] | None:
    """``([training parts], [validation parts])`` when the validation text is its own: ``eval_corpus`` given, or
    ``name`` a folder whose .txt files are named ``train*`` and ``valid*`` (``validation``, ``val``, ``test``,
    ``dev``). ``None``: validation is the end of the corpus."""
    if eval_corpus is not None:
        return [name], [eval_corpus]
    folder = Path(str(name)).expanduser()
    if str(name) in NAMED_CORPORA or str(name) == "builtin" or not folder.is_dir():
        return None
    files = sorted(folder.rglob("*.txt"))
    train = [f for f in files if f.stem.lower().startswith("train")]
    val = [f for f in files if f.stem.lower().split(".")[0].startswith(HELD_OUT_NAMES)]
    if not train and not val:
        return None
    if not train or not val:
        raise ValueError(
            f"corpus folder {folder} has {'train' if train else 'validation'} files but no "
            f"{'validation (valid*.txt)' if train else 'training (train*.txt)'} files"
        )
    return train, val


def encode_text(text: str, tokenizer: Any, batch: int = 4096) -> np.ndarray:
    """Token ids of ``text``, encoded paragraph by paragraph (split at blank lines) so the fast tokenizer can
    use its threads; no special tokens are added."""
    pieces = text.split("\n\n")
    pieces = [p + "\n\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    chunks: list[np.ndarray] = []
    for start in range(0, len(pieces), batch):
        group = pieces[start : start + batch]
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch(group, add_special_tokens=False)]
        else:
            ids = tokenizer(group, add_special_tokens=False)["input_ids"]
        chunks.extend(np.asarray(i, dtype=dtype) for i in ids)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def tokenize_corpus(name: str | Path = "shakespeare", tokenizer: Any = None) -> np.ndarray:
    """Token ids of a corpus (see :func:`load_corpus`), cached as ``.npy`` in the cache's ``tokens`` folder.

    The cache key is the corpus name, a hash of its text and a hash of the tokenizer, so an edited file or another
    tokenizer never reuses a stale array. ``tokenizer`` defaults to GPT-2's BPE.
    """
    text = load_corpus(name)
    tok = tokenizer if tokenizer is not None else assets.tokenizer()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(str(name)).stem or str(name)).strip("_")[:40] or "corpus"
    text_hash = hashlib.sha1(text.encode()).hexdigest()[:12]
    path = assets.cache_dir("tokens") / f"{slug}-{text_hash}-{_tokenizer_key(tok)}.npy"
    if path.exists():
        return np.load(path)
    ids = encode_text(text, tok)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, ids)
    tmp.replace(path)
    return ids


class TokenDataset:
    """A token sequence split by position: the last ``val_fraction`` is held out for validation.

    Tokens are kept as an int32 tensor; batches come out as int64. ``vocab_map`` (after :meth:`compact`) maps the
    dataset's ids back to the tokenizer's.
    """

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor,
        val_fraction: float = 0.05,
        vocab_size: int | None = None,
        vocab_map: torch.Tensor | None = None,
        split_at: int | None = None,
    ):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        data = torch.as_tensor(np.asarray(tokens).astype(np.int32, copy=False))
        if data.ndim != 1 or data.numel() < 2:
            raise ValueError(f"tokens must be a 1-D sequence of at least 2 ids, got shape {tuple(data.shape)}")
        # split_at: the validation tokens are a text of their own (a held-out file), after the training ones
        cut = round(data.numel() * (1.0 - val_fraction)) if split_at is None else int(split_at)
        if split_at is not None and not 0 < cut < data.numel():
            raise ValueError(f"the split leaves no training or no validation tokens (at {cut} of {data.numel()})")
        self.tokens = data
        self.train, self.val = data[:cut], data[cut:]
        self.val_fraction = val_fraction if split_at is None else 1.0 - cut / data.numel()
        self.split_at = split_at
        self.vocab_size = int(vocab_size) if vocab_size is not None else int(data.max()) + 1
        self.vocab_map = vocab_map
        self.chars: str | None = None  # set by from_chars: id i is the character chars[i]

    @classmethod
    def from_chars(
        cls, name: str | Path = "shakespeare", *, val_fraction: float = 0.05, eval_corpus: str | Path | None = None
    ) -> TokenDataset:
        """The corpus as characters, the vocabulary being the characters it uses (about 65 for Shakespeare).

        With so small a vocabulary the embedding and head are a few percent of a model, and the projected weights
        hold most of its parameters and optimizer state: the setting where these optimizers show what they save.
        """
        parts = held_out_parts(name, eval_corpus)
        texts = [load_corpus(name)] if parts is None else ["\n\n".join(map(load_corpus, p)) for p in parts]
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        used, ids = np.unique(codes, return_inverse=True)
        split_at = None if parts is None else len(texts[0])
        data = cls(ids.astype(np.int32), val_fraction, vocab_size=len(used), split_at=split_at)
        data.chars = "".join(map(chr, used))
        return data

    @classmethod
    def from_corpus(
        cls,
        name: str | Path = "shakespeare",
        *,
        tokenizer: Any = None,
        val_fraction: float = 0.05,
        compact: bool = False,
        eval_corpus: str | Path | None = None,
    ) -> TokenDataset:
        """The tokenised corpus (GPT-2 BPE unless ``tokenizer`` is given); ``compact=True`` applies :meth:`compact`.

        Validation is the last ``val_fraction`` of the corpus, or ``eval_corpus`` (a file or folder) when given, or,
        for a folder holding ``train*`` and ``valid*`` / ``validation*`` / ``val*`` / ``test*`` text files, those
        files by name (see :func:`held_out_parts`)."""
        tok = tokenizer if tokenizer is not None else assets.tokenizer()
        parts = held_out_parts(name, eval_corpus)
        if parts is None:
            data = cls(tokenize_corpus(name, tok), val_fraction, vocab_size=len(tok))
        else:
            train, val = ([tokenize_corpus(f, tok) for f in files] for files in parts)
            ids = np.concatenate([*train, *val])
            data = cls(ids, val_fraction, vocab_size=len(tok), split_at=sum(map(len, train)))
        return data.compact() if compact else data

    def decode(self, ids) -> str:
        """Text of character ids (``from_chars`` datasets only)."""
        if self.chars is None:
            raise ValueError("decode needs a character dataset (TokenDataset.from_chars)")
        return "".join(self.chars[int(i)] for i in ids)

    def compact(self) -> TokenDataset:
        """The same text with ids renumbered densely over the tokens that occur in it (train and validation).

        Shakespeare uses about 19,400 of GPT-2's 50,257 tokens; a model with that vocabulary trains about three
        times faster on CPU, where the output layer dominates a tiny model. ``vocab_map[new_id]`` is the old id.
        """
        used, inverse = torch.unique(self.tokens, return_inverse=True)
        mapping = used if self.vocab_map is None else self.vocab_map[used.long()]
        return TokenDataset(
            inverse.to(torch.int32),
            self.val_fraction,
            vocab_size=used.numel(),
            vocab_map=mapping,
            split_at=self.split_at,
        )

    def to_tokenizer_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids of dataset ids (identity unless the dataset was compacted), for decoding."""
        return ids if self.vocab_map is None else self.vocab_map[ids.long()]

    def split(self, name: str) -> torch.Tensor:
        """The ``train`` or ``val`` (``validation``) tokens."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use 'train' or 'val'")
        return self.train if SPLITS[name] == "train" else self.val

    def get_batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random contiguous windows of ``seq_len`` tokens as (input_ids, labels), int64.

        Starts are drawn from ``generator`` only (no global RNG). Labels equal the inputs: Hugging Face causal LMs
        shift them by one inside the loss.
        """
        data = self.split(split)
        _check_sizes(data, batch_size, seq_len, split)
        starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size,), generator=generator)
        return _windows(data, starts, seq_len)

    def fixed_batches(
        self, split: str, n_batches: int, batch_size: int, seq_len: int, seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of batches (same seed, same batches), e.g. held-out batches for evaluation."""
        generator = torch.Generator().manual_seed(seed)
        return [self.get_batch(split, batch_size, seq_len, generator) for _ in range(n_batches)]

    def whole_split(self, split: str, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every token of ``split`` once, in consecutive non-overlapping windows, as full batches (the windows past
        the last full batch, fewer than ``batch_size``, are left out: each batch weighs the same in the mean)."""
        data = self.split(split)
        _check_sizes(data, batch_size, seq_len, split)
        starts = torch.arange(0, data.numel() - seq_len + 1, seq_len)
        full = starts.numel() // batch_size * batch_size
        if not full:
            raise ValueError(
                f"the {split} split has {starts.numel()} windows of {seq_len} tokens, fewer than one batch of "
                f"{batch_size}: lower --batch-size or --seq-len"
            )
        return [_windows(data, s, seq_len) for s in starts[:full].split(batch_size)]


def _check_sizes(data: torch.Tensor, batch_size: int, seq_len: int, split: str) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if data.numel() < seq_len:
        raise ValueError(f"the {split} split has {data.numel()} tokens, fewer than seq_len={seq_len}")


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = data[starts[:, None] + torch.arange(seq_len)].long()
    return input_ids, input_ids.clone()


class BatchStream:
    """An endless, resumable iterator of (input_ids, labels) batches from one split of a :class:`TokenDataset`.

    ``shuffle=True`` draws random windows from the stream's own generator (seeded by ``seed``); ``shuffle=False``
    walks through consecutive non-overlapping windows, wrapping at the end. :meth:`state_dict` holds the generator
    state and position, so a run resumed from it sees exactly the batches it would have seen.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 64,
        seed: int = 0,
        shuffle: bool = True,
    ):
        _check_sizes(dataset.split(split), batch_size, seq_len, split)
        self.dataset, self.split = dataset, split
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.position = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shuffle:
            batch = self.dataset.get_batch(self.split, self.batch_size, self.seq_len, self.generator)
        else:
            data = self.dataset.split(self.split)
            n_windows = data.numel() // self.seq_len
            index = (self.position + torch.arange(self.batch_size)) % n_windows
            batch = _windows(data, index * self.seq_len, self.seq_len)
            self.position = (self.position + self.batch_size) % n_windows
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only: step, position, generator state and the settings they depend on."""
        return {
            "step": self.step,
            "position": self.position,
            "generator": self.generator.get_state(),
            "split": self.split,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the batch shape and mode must be the ones it was saved with."""
        for key in ("split", "batch_size", "seq_len", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"stream state has {key}={state[key]!r} but this stream has {getattr(self, key)!r}")
        self.step = int(state["step"])
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])
