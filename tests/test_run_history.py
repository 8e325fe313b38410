"""A run folder holds exactly one run's history, and nothing written is lost: a resume into another run's folder is
refused, one into an empty folder carries its history with it, a resume from an older checkpoint never discards
newer ones silently, a checkpoint that does not load is set aside (not counted among those kept), the model folder
is written whole or not at all and can be rebuilt from the checkpoint, and a full disk is one line that says so."""

import errno
import json
import os

import pytest
import torch

from conftest import lines, run
from gradspace.train import export as export_module
from gradspace.train.runfolder import LOCK, QUARANTINE
from test_cli import SMALL, assert_clean_error
from test_finetune import sentiment_csv  # noqa: F401 - the fixture
from test_runfolder import snapshot


def steps_logged(folder):
    return [r["step"] for r in lines(folder / "metrics.jsonl") if r["type"] == "train"]


def checkpoints(folder):
    return sorted(p.name for p in (folder / "checkpoints").iterdir())


def finished_run(tmp_path):
    """A finished 6-step run with checkpoints at steps 4 and 6 (kept: the newest two)."""
    out = tmp_path / "A"
    assert run("pretrain", *SMALL, "--method", "galore", "--save-every", "2", "--out", out) == 0
    return out


@pytest.fixture
def finished(tmp_path):
    return finished_run(tmp_path)


def test_resume_into_a_folder_holding_another_run_is_refused_and_touches_nothing(finished, tmp_path, capsys):
    other = tmp_path / "B"
    assert run("pretrain", *SMALL, "--method", "adamw", "--steps", "4", "--out", other) == 0
    before, source = snapshot(other), snapshot(finished)
    code = run("pretrain", "--resume", finished, "--steps", "8", "--out", other, "--threads", "1")
    assert_clean_error(capsys, code, "already holds another run", "--overwrite")
    assert snapshot(other) == before and snapshot(finished) == source
    # with --overwrite B becomes A's continuation, and nothing of B's own run is left beside it
    assert run("pretrain", "--resume", finished, "--steps", "8", "--out", other, "--overwrite", "--threads", "1") == 0
    assert steps_logged(other) == list(range(1, 9))  # A's history to step 6, then 7 and 8: one run
    assert checkpoints(other) == ["ckpt-0000008.pt"]
    assert json.loads((other / "config.json").read_text())["method"] == "galore"
    assert snapshot(finished) == source  # the run resumed from is untouched


def test_resume_into_an_empty_folder_branches_with_the_history(finished, tmp_path):
    branch = tmp_path / "branch"
    assert run("pretrain", "--resume", finished, "--steps", "8", "--out", branch, "--threads", "1") == 0
    assert steps_logged(branch) == list(range(1, 9))
    summary = json.loads((branch / "summary.json").read_text())
    assert [p["step"] for p in summary["history"]] == list(range(1, 9))  # the whole run's curve
    assert [e["step"] for e in summary["evals"]] == [3, 6, 8]
    assert steps_logged(finished) == list(range(1, 7))


def test_resume_in_place_from_an_older_checkpoint_keeps_newer_ones_unless_asked(finished, capsys):
    older = finished / "checkpoints" / "ckpt-0000004.pt"
    before = snapshot(finished)
    code = run("pretrain", "--resume", older, "--steps", "6", "--threads", "1")
    assert_clean_error(capsys, code, "checkpoints after step 4", "ckpt-0000006.pt", "--overwrite")
    assert snapshot(finished) == before
    assert run("pretrain", "--resume", older, "--steps", "6", "--overwrite", "--threads", "1") == 0
    assert checkpoints(finished) == ["ckpt-0000004.pt", "ckpt-0000006.pt"]
    assert steps_logged(finished) == list(range(1, 7))


def test_a_corrupt_newest_checkpoint_is_set_aside_and_not_counted(finished, capsys):
    newest = finished / "checkpoints" / "ckpt-0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert run("pretrain", "--resume", finished, "--steps", "10", "--save-every", "2", "--threads", "1") == 0
    assert "set aside ckpt-0000006.pt" in capsys.readouterr().err
    # two good checkpoints kept, the corrupt one beside them under another name, never pruned in their place
    assert checkpoints(finished) == ["ckpt-0000006.pt" + QUARANTINE, "ckpt-0000008.pt", "ckpt-0000010.pt"]
    assert steps_logged(finished) == list(range(1, 11))


def test_the_lock_is_taken_before_the_checkpoint_is_picked(finished, capsys):
    (finished / LOCK).write_text(str(os.getppid()))  # a live writer
    newest = finished / "checkpoints" / "ckpt-0000006.pt"
    newest.write_bytes(b"being written")
    code = run("pretrain", "--resume", finished, "--steps", "8", "--threads", "1")
    assert_clean_error(capsys, code, "another gradspace process")
    assert newest.read_bytes() == b"being written"  # not read, not set aside


def test_the_lock_is_held_until_the_model_is_exported(tmp_path, monkeypatch):
    held = []
    real = export_module._written

    def spy(folder, *args, **kwargs):
        held.append((folder / LOCK).exists())
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(export_module, "_written", spy)
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--out", out) == 0
    assert held == [True] and not (out / LOCK).exists()


def test_resume_accepts_the_runs_own_values_given_explicitly(finished, capsys):
    # the run used the tiny preset's rank 16 and update gap 50 (rank=None, update_gap=None in its config)
    assert run("pretrain", "--resume", finished, "--steps", "7", "--rank", "16", "--update-gap", "50") == 0
    code = run("pretrain", "--resume", finished, "--steps", "8", "--rank", "8")
    assert_clean_error(capsys, code, "rank=16", "rank=8")
    fresh = finished.parent / "B"  # a run that never named its rank is told its preset's
    assert run("pretrain", *SMALL, "--method", "galore", "--out", fresh) == 0
    code = run("pretrain", "--resume", fresh, "--steps", "8", "--rank", "8")
    assert_clean_error(capsys, code, "rank=16 (the default)", "rank=8")


def test_out_naming_a_file_is_a_clean_error(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("mine")
    assert_clean_error(capsys, run("pretrain", *SMALL, "--out", file), "is a file", "--out")
    assert file.read_text() == "mine"


def test_a_bad_run_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert_clean_error(capsys, run("pretrain", *SMALL, "--lr", "-1", "--out", out), "lr")
    assert not out.exists()


def _full_disk_save(real):
    def save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    return save


def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(finished, monkeypatch, capsys):
    import shutil

    before = snapshot(finished / "checkpoints")
    monkeypatch.setattr(torch, "save", _full_disk_save(torch.save))
    usage = shutil.disk_usage(finished)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    code = run("pretrain", "--resume", finished, "--steps", "8", "--threads", "1")
    assert_clean_error(capsys, code, "the disk is full", "1 MiB free", "checkpoint")
    assert snapshot(finished / "checkpoints") == before  # no half-written file, the older ones kept
    assert not (finished / LOCK).exists()
    monkeypatch.undo()
    assert run("pretrain", "--resume", finished, "--steps", "8", "--threads", "1") == 0


def test_a_failed_export_keeps_the_previous_model_and_export_rebuilds_it(finished, monkeypatch, capsys):
    model = finished / "model"
    before = snapshot(model)
    assert json.loads((model / export_module.MARKER).read_text())["step"] == 6

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", no_space)
    code = run("pretrain", "--resume", finished, "--steps", "8", "--threads", "1")
    assert_clean_error(capsys, code, "the disk is full", "model")
    assert snapshot(model) == before  # the step-6 export, whole
    assert not [p for p in finished.iterdir() if p.name.startswith(".model")]
    monkeypatch.undo()
    # the run reached step 8 but its export did not happen: `gradspace export` writes it (and a resume would too)
    assert not (finished / "summary.json").exists()
    assert run("export", finished, "--threads", "1") == 0
    assert json.loads((model / export_module.MARKER).read_text())["step"] == 8
    assert "step 8" in capsys.readouterr().out
    text = export_module.sample(finished, "ROMEO:", max_new_tokens=4)
    assert text.startswith("ROMEO")


def test_export_rebuilds_the_runs_own_model_and_any_checkpoints(finished):
    import shutil

    from transformers import AutoModelForCausalLM

    def weights():
        return AutoModelForCausalLM.from_pretrained(finished / "model").state_dict()

    own = weights()  # what the run exported at its end
    shutil.rmtree(finished / "model")
    assert run("export", finished) == 0
    again = weights()
    assert own.keys() == again.keys() and all(torch.equal(own[k], again[k]) for k in own)
    ckpt = finished / "checkpoints" / "ckpt-0000004.pt"
    assert run("export", ckpt, "--overwrite") == 0  # an earlier step over the step-6 model: asked for
    state, earlier = torch.load(ckpt, weights_only=True)["model"], weights()
    layers = [k for k in state if ".layers." in k]
    assert layers and all(torch.equal(earlier[k], state[k]) for k in layers)
    assert not all(torch.equal(earlier[k], own[k]) for k in layers)
    assert json.loads((finished / "model" / export_module.MARKER).read_text())["step"] == 4


def test_a_finetuning_run_exports_its_labels_and_export_rebuilds_it(tmp_path, sentiment_csv):  # noqa: F811
    import shutil

    from transformers import AutoModelForSequenceClassification, pipeline

    from gradspace.train.tasks import load_task
    from test_finetune import FAST

    out = tmp_path / "run"
    assert run("finetune", "--task", sentiment_csv, "--steps", "3", *FAST, "--out", out) == 0
    names = load_task(str(sentiment_csv)).labels
    own = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert list(own.config.id2label.values()) == names
    shutil.rmtree(out / "model")
    assert run("export", out, "--threads", "1") == 0
    again = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in own.state_dict().items())
    answer = pipeline("text-classification", model=str(out / "model"))("a fine film")[0]["label"]
    assert answer in names
