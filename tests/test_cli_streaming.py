"""The Hugging Face streaming path of ``gradspace pretrain --dataset NAME --streaming``, with a stand-in ``datasets``
module (the hub is unreachable here): batches are packed from the rows' text, and a resumed run is bit-identical."""

import random
import sys
import types

import torch

from conftest import run
from gradspace.train.checkpoint import list_checkpoints, load_checkpoint
from test_cli import SMALL

ROWS = [
    {"text": f"Line {i}: the quick brown fox {'jumps over' if i % 2 else 'naps beside'} the lazy dog {i}."}
    for i in range(200)
]


class FakeIterable:
    """Just what gradspace uses of ``datasets.IterableDataset``: iteration and a seeded ``shuffle``."""

    def __init__(self, rows, calls):
        self.rows, self.calls = rows, calls

    def __iter__(self):
        return iter(self.rows)

    def shuffle(self, seed, buffer_size):
        self.calls.append(("shuffle", seed, buffer_size))
        rows = list(self.rows)
        random.Random(seed).shuffle(rows)
        return FakeIterable(rows, self.calls)


def fake_datasets(calls):
    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        offset = 0 if split == "train" else 100  # a different "validation" split
        return FakeIterable(ROWS[offset:] + ROWS[:offset], calls)

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_streaming_trains_validates_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(calls))
    args = [
        *SMALL,
        "--dataset",
        "someone/corpus",
        "--streaming",
        "--method",
        "galore",
        "--rank",
        "8",
        "--update-gap",
        "2",
    ]
    assert run("pretrain", *args, "--out", tmp_path / "full") == 0
    assert ("someone/corpus", "train", True) in calls and ("someone/corpus", "validation", True) in calls
    assert run("pretrain", *args, "--out", tmp_path / "cut", "--stop-after", "3") == 130
    assert run("pretrain", "--resume", tmp_path / "cut", "--threads", "1") == 0
    full = load_checkpoint(list_checkpoints(tmp_path / "full" / "checkpoints")[-1])
    cut = load_checkpoint(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1])
    assert full["step"] == cut["step"] == 6
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    captured = capsys.readouterr()
    assert "streaming someone/corpus" in captured.out + captured.err


def test_streaming_without_the_datasets_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code = run("pretrain", *SMALL, "--dataset", "someone/corpus", "--streaming", "--out", tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2 and "pip install datasets" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_streaming_uses_its_seed_for_training_rows_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(calls))
    args = [*SMALL, "--dataset", "someone/corpus", "--streaming", "--method", "adamw", "--steps", "2"]
    assert run("pretrain", *args, "--seed", "1", "--out", tmp_path / "a") == 0
    assert run("pretrain", *args, "--seed", "2", "--out", tmp_path / "b") == 0
    assert [c for c in calls if c[0] == "shuffle"] == [("shuffle", 1, 10_000), ("shuffle", 2, 10_000)]
