"""Values that pass a type check but cannot train are refused up front, as one line that says what to give: a
one-token sequence, a non-finite or out-of-range float, a seed no generator takes, a max length with no room for
text, and --eval-batches 0 on a streamed dataset; --eval-batches 0 on a local corpus validates on the whole split."""

import json

import pytest
import torch

from conftest import run
from gradspace.train.config import UsageError, check_max_length

PRETRAIN = ["pretrain", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--threads", "1"]
PRETRAIN += ["--tokenizer", "chars", "--eval-batches", "1"]


def assert_usage_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    msg = [ln for ln in err.splitlines() if ln.startswith("gradspace: error:")]
    assert len(msg) == 1, err
    for w in words:
        assert w in msg[0], msg[0]


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--seq-len", "1"], ["seq-len 1", "no next token", "--seq-len 2"]),  # was a NaN loss: "diverged", exit 3
        (["--lr", "inf"], ["lr must be a finite number > 0", "inf"]),  # was exit 3, "lower the learning rate"
        (["--lr", "nan"], ["lr must be a finite number > 0"]),
        (["--lr", "0"], ["lr must be a finite number > 0"]),  # was a run that never moves
        (["--lr", "-0.001"], ["lr must be a finite number > 0"]),
        (["--scale", "inf"], ["scale must be a finite number > 0"]),
        (["--weight-decay", "inf"], ["weight-decay must be a finite number >= 0"]),
        (["--grad-clip", "inf"], ["grad-clip must be a finite number >= 0", "0 turns clipping off"]),
        (["--grad-clip", "nan"], ["grad-clip must be a finite number >= 0"]),
        (["--seed", "-1"], ["seed must be an integer from 0 to 4294967295"]),
        (["--seed", str(2**64 + 1)], ["seed must be an integer from 0"]),  # was "Overflow when unpacking", exit 1
    ],
)
def test_pretrain_refuses_values_that_cannot_train(tmp_path, capsys, bad, words):
    out = tmp_path / "bad"
    assert_usage_error(capsys, run(*PRETRAIN, *bad, "--out", out), *words)
    assert not out.exists()


def test_eval_batches_0_validates_on_the_whole_split_of_a_local_corpus(tmp_path, capsys):
    from gradspace.train.config import PRETRAIN as COMMAND
    from gradspace.train.streams import Data

    cfg = {**COMMAND.defaults, "tokenizer": "chars", "seq_len": 16, "batch_size": 2, "eval_batches": 0}
    data = Data(cfg)
    val = data.dataset.val
    windows = val.numel() // 16
    assert len(data.eval_batches) == windows // 2
    first, last = data.eval_batches[0][0], data.eval_batches[-1][0]
    assert torch.equal(first[0], val[:16].long()) and torch.equal(first[1], val[16:32].long())
    assert torch.equal(last[-1], val[(windows // 2 * 2 - 1) * 16 :][:16].long())  # consecutive, nothing skipped
    assert run(*PRETRAIN[:-2], "--eval-batches", "0", "--out", tmp_path / "run") == 0
    code = run(*PRETRAIN[:-2], "--eval-batches", "0", "--streaming", "--out", tmp_path / "s")
    assert_usage_error(capsys, code, "eval-batches 0", "local corpus")


def test_a_config_files_float_must_be_a_number(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": "fast", "scale": 1}))
    code = run(*PRETRAIN, "--config", config, "--out", tmp_path / "bad")
    assert_usage_error(capsys, code, "lr must be a finite number > 0, got 'fast'")


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--lr", "inf"], ["lr must be a finite number > 0"]),
        (["--weight-decay", "inf"], ["weight-decay must be a finite number"]),
        (["--seed", "-3"], ["seed must be an integer from 0"]),
    ],
)
def test_finetune_refuses_them_too(tmp_path, capsys, bad, words):
    (tmp_path / "good.csv").write_text("text,label\ngood,1\nbad,0\nfine,1\n")
    out = tmp_path / "bad"
    assert_usage_error(capsys, run("finetune", "--task", tmp_path / "good.csv", *bad, "--out", out), *words)
    assert not out.exists()


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--lr-grid", "1e-3,inf"], ["--lr-grid", "finite positive"]),
        (["--lr", "nan"], ["lr must be a finite number > 0"]),
        (["--seeds", "2", "--seed", "4294967295"], ["reaches seed 4294967296", "smaller --seed"]),
    ],
)
def test_compare_refuses_them_before_any_run(tmp_path, capsys, bad, words):
    out = tmp_path / "cmp"
    assert_usage_error(capsys, run("compare", "--methods", "adamw,galore", *PRETRAIN[1:], *bad, "--out", out), *words)
    assert not out.exists()


class Tokenizer:
    """BERT's counts: [CLS] text [SEP], or [CLS] a [SEP] b [SEP]."""

    def num_special_tokens_to_add(self, pair=False):
        return 3 if pair else 2


def test_max_length_leaves_room_for_text_beside_the_special_tokens():
    for pair, too_short, enough in ((False, 2, 3), (True, 4, 5)):
        with pytest.raises(UsageError, match=f"max-length {too_short} leaves no room.*--max-length {enough}"):
            check_max_length({"max_length": too_short, "model": "minilm"}, Tokenizer(), pair)
        check_max_length({"max_length": enough, "model": "minilm"}, Tokenizer(), pair)


def test_compare_refuses_a_max_length_with_no_room_for_text(tmp_path, capsys):
    """MiniLM with --max-length 2 would train on [CLS] [SEP] alone (and with 1, on untruncated texts)."""
    (tmp_path / "good.csv").write_text("text,label\ngood film,1\nbad film,0\nfine film,1\ndull film,0\n")
    out = tmp_path / "cmp"
    argv = ["compare", "--task", tmp_path / "good.csv", "--methods", "adamw", "--steps", "1", "--max-length", "2"]
    assert_usage_error(capsys, run(*argv, "--threads", "1", "--out", out), "max-length 2", "--max-length 3")
    assert not (out / "adamw").exists()
