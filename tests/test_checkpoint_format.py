"""A checkpoint carries its format; one of another format is a one-line error saying what wrote it and what to do,
never read as this one's (nor passed over for an older checkpoint of the run)."""

from __future__ import annotations

import pytest
import torch

from conftest import run
from gradspace.train import checkpoint as ck
from gradspace.train.errors import CheckpointError
from test_cli import assert_clean_error


def write(folder, step, **changes):
    path = ck.save_checkpoint(folder, step, model=torch.nn.Linear(2, 2), optimizer=None, keep=0)
    payload = {**torch.load(path, weights_only=True), **changes}
    torch.save(payload, path)
    return path


def test_a_checkpoint_holds_the_current_format(tmp_path):
    assert ck.load_checkpoint(write(tmp_path, 1))["format"] == ck.FORMAT


@pytest.mark.parametrize(
    "found, says",
    [(0, "an unreleased development version of gradspace"), (99, "a newer gradspace"), ("2", "development")],
)
def test_another_format_is_a_clear_error(tmp_path, found, says):
    path = write(tmp_path, 1, format=found)
    with pytest.raises(CheckpointError) as err:
        ck.load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and f"has format {found!r}" in message and says in message
    assert f"reads format {ck.FORMAT}" in message
    assert ("upgrade gradspace" if found == 99 else "start the run again") in message


def test_another_format_is_refused_before_its_fields_are_looked_at(tmp_path):
    path = tmp_path / "ckpt-0000001.pt"
    torch.save({"format": 99, "weights": {}}, path)
    with pytest.raises(CheckpointError, match="newer gradspace"):
        ck.load_checkpoint(path)


def test_a_newer_format_is_not_passed_over_for_an_older_checkpoint(tmp_path):
    write(tmp_path, 1)
    write(tmp_path, 2, format=99)
    with pytest.raises(CheckpointError, match="format 99"):
        ck.load_newest_good(tmp_path)


def test_resuming_another_format_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path / "run" / "checkpoints", 3, format=0)
    assert_clean_error(capsys, run("pretrain", "--resume", path), "format 0", "start the run again")
