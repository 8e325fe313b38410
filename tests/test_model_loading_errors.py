"""Broken model folders and data files are one-line errors that name the file and say what to do; a --model folder
that starts from random weights, or has more embeddings than its tokenizer has tokens, says so; `gradspace sample`
refuses a fine-tuning run's classifier."""

import json
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import run
from gradspace.train import assets
from test_tokenizer_exports import TEXT, classifier_run  # noqa: F401 - the fixture

ARGS = ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--threads", "1"]
ARGS += ["--method", "adamw"]
FINETUNE = ["--method", "adamw", "--steps", "1", "--batch-size", "4", "--max-length", "16", "--threads", "1"]


def one_line_error(capsys, code, *words):
    """The exit code is 2 and stderr holds one `gradspace: error:` line, with ``words``, and no traceback."""
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    msg = [ln for ln in err.splitlines() if ln.startswith("gradspace: error:")]
    assert len(msg) == 1, err
    for w in words:
        assert w in msg[0], msg[0]
    return msg[0]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "task.csv"
    path.write_text("text,label\n" + "".join(f"the film was {('bad', 'good')[i % 2]},{i % 2}\n" for i in range(20)))
    return path


def gpt2_folder(path, vocab_size=50257, tokenizer=True, weights=True):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=vocab_size))
    if weights:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
    if tokenizer:
        assets.tokenizer().save_pretrained(path)
    return path


def test_sample_refuses_a_classifier_naming_it_and_what_loads_it(classifier_run, capsys):  # noqa: F811
    capsys.readouterr()
    msg = one_line_error(
        capsys,
        run("sample", classifier_run, "--max-new-tokens", "3"),
        "sequence classifier",
        "BertForSequenceClassification",
        "sentiment.csv",
        "AutoModelForSequenceClassification",
    )
    assert str(classifier_run / "model") in msg
    assert capsys.readouterr().out == ""  # no random words


def test_a_truncated_safetensors_is_named(tmp_path, corpus, task, capsys):
    folder = gpt2_folder(tmp_path / "gpt2")
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    code = run("pretrain", "--model", folder, "--dataset", corpus, *ARGS, "--out", tmp_path / "r")
    one_line_error(capsys, code, str(weights), "truncated or corrupt", "re-download or re-export")
    code = run("finetune", "--model", folder, "--task", task, *FINETUNE, "--out", tmp_path / "f")
    one_line_error(capsys, code, str(weights), "truncated or corrupt")
    one_line_error(capsys, run("sample", folder, "--max-new-tokens", "2"), str(weights), "truncated or corrupt")


def test_a_broken_config_json_is_reported_as_itself_not_as_the_tokenizer(tmp_path, corpus, task, capsys):
    folder = gpt2_folder(tmp_path / "gpt2")
    (folder / "config.json").write_text('{"model_type": "gpt2",\n')
    code = run("pretrain", "--model", folder, "--dataset", corpus, *ARGS, "--out", tmp_path / "r")
    msg = one_line_error(capsys, code, str(folder / "config.json"), "not valid JSON", "line 2")
    assert "tokenizer" not in msg
    code = run("finetune", "--model", folder, "--task", task, *FINETUNE, "--out", tmp_path / "f")
    one_line_error(capsys, code, str(folder / "config.json"), "not valid JSON")


LATIN1 = "ROMEO: café au lait, to be or not to be\n".encode("latin-1") * 40  # é is byte 0xe9


def test_a_corpus_that_is_not_utf8_is_named_with_the_offset(tmp_path, corpus, capsys):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(LATIN1)
    offset = LATIN1.index(b"\xe9")
    code = run("pretrain", "--dataset", bad, "--tokenizer", "chars", *ARGS, "--out", tmp_path / "r")
    one_line_error(capsys, code, str(bad), f"offset {offset}", "0xe9", "convert it to UTF-8")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT, encoding="utf-8")
    (folder / "b.txt").write_bytes(LATIN1)
    code = run("pretrain", "--dataset", folder, *ARGS, "--out", tmp_path / "r")
    one_line_error(capsys, code, str(folder / "b.txt"), f"offset {offset}", "UTF-8")
    code = run(
        "pretrain", "--dataset", corpus, "--eval-dataset", bad, "--tokenizer", "chars", *ARGS, "--out", tmp_path / "r"
    )
    one_line_error(capsys, code, str(bad), f"offset {offset}")


def test_a_task_file_that_is_not_utf8_is_named_with_the_offset(tmp_path, capsys):
    rows = "".join(f"the film was {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(20))
    table = b"text,label\n" + rows.encode() + "un café noir,1\n".encode("latin-1")
    offset = table.index(b"\xe9")
    for name, data in [
        ("task.csv", table),
        ("task.tsv", table.replace(b",", b"\t")),
        ("task.jsonl", b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n'),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        at = data.index(b"\xe9")
        code = run("finetune", "--task", path, *FINETUNE, "--out", tmp_path / "f")
        one_line_error(capsys, code, str(path), f"offset {at}", "convert it to UTF-8")
    good = tmp_path / "good.csv"
    good.write_text("text,label\n" + rows)
    code = run("finetune", "--task", good, "--eval-dataset", tmp_path / "task.csv", *FINETUNE, "--out", tmp_path / "f")
    one_line_error(capsys, code, str(tmp_path / "task.csv"), f"offset {offset}")


def test_a_config_only_model_says_it_starts_from_random_weights_and_which_tokenizer(tmp_path, corpus, capsys):
    folder = gpt2_folder(tmp_path / "gpt2", tokenizer=False, weights=False)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    capsys.readouterr()
    assert run("pretrain", "--model", folder, "--dataset", corpus, *ARGS, "--out", tmp_path / "r") == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "random weights" in ln]
    assert len(notes) == 1, notes
    assert "--fresh" in notes[0] and "GPT-2's tokenizer" in notes[0] and "no tokenizer files" in notes[0]
    assert str(folder) in notes[0]
    # asked for (--fresh), or with weights: no notice
    assert run("pretrain", "--model", folder, "--fresh", "--dataset", corpus, *ARGS, "--out", tmp_path / "s") == 0
    assert "random weights" not in capsys.readouterr().err


def test_a_tokenizer_smaller_than_the_embedding_is_a_notice_with_both_sizes(tmp_path, corpus, capsys):
    folder = gpt2_folder(tmp_path / "gpt2", vocab_size=50304)  # padded to a multiple of 64, as many models are
    capsys.readouterr()
    assert run("pretrain", "--model", folder, "--dataset", corpus, *ARGS, "--out", tmp_path / "r") == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "token embeddings" in ln]
    assert len(notes) == 1, notes
    assert "50,304" in notes[0] and "50,257" in notes[0] and notes[0].startswith("gradspace:")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 1
