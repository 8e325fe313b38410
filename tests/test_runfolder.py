"""A run folder is never lost: a second run into it is refused (nothing touched) unless --overwrite, a live writer
holds a lock another process cannot take, and a killed run's stale lock does not block the next one."""

import json
import os

from conftest import run
from gradspace.train.runfolder import LOCK
from test_cli import SMALL, assert_clean_error


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--method", "adamw", "--out", out) == 0
    before = snapshot(out)
    code = run("pretrain", *SMALL, "--method", "galore", "--out", out)
    assert_clean_error(capsys, code, "already holds a run", "--resume", "--overwrite")
    assert snapshot(out) == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    assert run("pretrain", *SMALL, "--method", "galore", "--overwrite", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["method"] == "galore"
    assert (out / "notes.txt").read_text() == "mine"  # only gradspace's own files are replaced
    assert not (out / LOCK).exists()


def test_a_live_writer_locks_the_folder_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(str(os.getppid()))  # a live process that is not this one
    code = run("pretrain", *SMALL, "--out", out)
    assert_clean_error(capsys, code, "another gradspace process", str(os.getppid()))
    assert not (out / "config.json").exists()
    (out / LOCK).write_text("999999999")  # no such process: a killed run's lock
    assert run("pretrain", *SMALL, "--out", out) == 0
    assert not (out / LOCK).exists()


def test_compare_refuses_a_used_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "adamw", *SMALL, "--steps", "2", "--out", out]
    assert run(*args) == 0
    assert_clean_error(capsys, run(*args), "already holds a comparison", "--overwrite")
    assert run(*args, "--overwrite") == 0
