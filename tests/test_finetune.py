"""gradspace finetune: GLUE metrics, the built-in and file tasks, the MiniLM encoder, runs, resume, bad input."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from conftest import lines, run
from gradspace.train import metrics as M
from gradspace.train.checkpoint import list_checkpoints, load_checkpoint
from gradspace.train.tasks import BUILTIN, ExampleStream, Split, load_task

SUBJECTS = [
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the ending",
    "the soundtrack",
    "the cast",
    "the script",
]
GOOD = ["wonderful", "brilliant", "delightful", "superb", "moving", "excellent"]
BAD = ["awful", "boring", "terrible", "dreadful", "dull", "horrible"]
HELD_OUT = [("great", 1), ("superb", 1), ("dreadful", 0), ("dull", 0), ("moving", 1)]
FAST = ["--batch-size", "8", "--max-length", "16", "--threads", "1", "--log-every", "1"]


def assert_clean_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    msg = [ln for ln in err.splitlines() if ln.startswith("gradspace: error:")]
    assert len(msg) == 1, err
    for w in words:
        assert w in msg[0], msg[0]


@pytest.fixture
def sentiment_csv(tmp_path):
    """96 short reviews whose label is given away by one word: learnable in a dozen steps."""
    path = tmp_path / "sentiment.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for (s, a), y in [
            *((p, 1) for p in itertools.product(SUBJECTS, GOOD)),
            *((p, 0) for p in itertools.product(SUBJECTS, BAD)),
        ]:
            w.writerow([f"{s} was {a}", y])
    return path


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values():
    pred, label = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # TP 2, FP 1, FN 1, TN 2
    assert M.accuracy(pred, label) == pytest.approx(4 / 6)
    assert M.f1_binary(pred, label) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert M.matthews_corrcoef(pred, label) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    # 3 classes: confusion rows (true) [[2,1,0],[0,1,1],[1,0,1]]: c=4, s=7, t=(3,2,2), p=(3,2,2)
    pred3, label3 = [0, 0, 1, 1, 2, 2, 0], [0, 0, 0, 1, 1, 2, 2]
    assert M.matthews_corrcoef(pred3, label3) == pytest.approx((4 * 7 - 17) / (49 - 17))
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction: undefined, 0 as scikit-learn
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
    assert M.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    assert M.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks x (1, 2.5, 2.5, 4) vs y (1, 2, 3, 4): deviations (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5)
    assert M.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert M.regression_metrics(np.array([1.0, 2.0]), np.array([1.0, 4.0]))["mse"] == pytest.approx(2.0)
    assert set(M.classification_metrics(pred3, label3, 3)) == {"accuracy", "mcc"}
    with pytest.raises(ValueError, match="equal length"):
        M.accuracy([1, 0], [1])


# ---------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize(
    "name, sizes, num_labels, metric",
    [
        ("rotten-tomatoes", (11752, 1000), 2, "accuracy"),
        ("review-ratings", (13300, 1000), 1, "pearson"),
        ("trec", (4881, 500), 6, "accuracy"),
        ("sms-spam", (4012, 500), 2, "f1"),
    ],
)
def test_builtin_tasks_load_and_split_deterministically(name, sizes, num_labels, metric):
    task = load_task(name)
    assert (len(task.train), len(task.validation)) == sizes
    assert task.num_labels == num_labels and task.metric == metric and name in BUILTIN
    assert not set(task.train.text) & set(task.validation.text)
    assert all(t.strip() for t in task.train.text[:200])
    if task.regression:
        assert all(-4 <= y <= 4 for y in task.train.label) and len(set(task.train.label)) > 100
    else:
        assert set(task.train.label) == set(range(num_labels))
    again = load_task(name)
    assert again.validation.text == task.validation.text and again.train.label == task.train.label


def test_sms_spam_is_imbalanced_and_rotten_tomatoes_has_no_plots():
    spam = load_task("sms-spam")
    assert 0.08 < np.mean(spam.train.label) < 0.2
    rt = load_task("rotten-tomatoes")
    assert max(len(t.split()) for t in rt.train.text) < 80  # plot summaries run to hundreds of words


def test_local_files_csv_tsv_jsonl(tmp_path, sentiment_csv):
    task = load_task(str(sentiment_csv))
    assert (len(task.train), len(task.validation)) == (86, 10) and task.labels == ["0", "1"] and task.metric == "f1"
    tsv = tmp_path / "nli.tsv"
    tsv.write_text(
        "sentence1\tsentence2\tlabel\n" + "".join(f"a{i}\tb{i}\t{['yes', 'no', 'maybe'][i % 3]}\n" for i in range(30))
    )
    nli = load_task(str(tsv))
    assert nli.labels == ["maybe", "no", "yes"] and nli.metric == "accuracy" and nli.train.text_pair is not None
    i = nli.train.text.index("a4")
    assert nli.train.text_pair[i] == "b4" and nli.labels[nli.train.label[i]] == "no"
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": f"s{i}", "score": i / 3}) + "\n" for i in range(20)))
    reg = load_task(str(jsonl))
    assert reg.regression and reg.metric == "pearson" and len(reg.validation) == 2


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: "no-such-task", ["unknown task 'no-such-task'", "rotten-tomatoes"]),
        (lambda d: str(d / "missing.csv"), ["does not exist"]),
        (
            lambda d: (d / "x.csv").write_text("text,stars\nok,1\nbad,0\n") and str(d / "x.csv"),
            ["no label column", "stars"],
        ),
        (lambda d: (d / "y.csv").write_text("body,label\nok,1\nbad,0\n") and str(d / "y.csv"), ["no text column"]),
        (lambda d: (d / "z.csv").write_text("text,label\nok,1\nfine,1\n") and str(d / "z.csv"), ["single class"]),
        (lambda d: (d / "e.csv").write_text("text,label\nok,1\nfine,\n") and str(d / "e.csv"), ["row 2"]),
        (lambda d: "glue/nope", ["unknown GLUE task"]),
    ],
)
def test_bad_tasks_raise_one_line_value_errors(tmp_path, make, words):
    with pytest.raises(ValueError) as info:
        load_task(make(tmp_path))
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_glue_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (
            (_ for _ in ()).throw(ImportError(name)) if name == "datasets" else real_import(name, *a, **k)
        ),
    )
    with pytest.raises(ValueError, match="pip install datasets"):
        load_task("glue/sst2")


def test_example_stream_epochs_and_exact_resume():
    split = Split([f"t{i}" for i in range(10)], list(range(10)))

    def ids(s):  # the collate step is not under test: batches are the example ids
        return {"labels": torch.tensor(s.label)}

    stream = ExampleStream(split, ids, batch_size=4, seed=3)
    first = torch.cat([next(stream)["labels"] for _ in range(5)]).tolist()  # 20 = two epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10)) and first[:10] != first[10:]
    fresh = ExampleStream(split, ids, batch_size=4, seed=3)
    for _ in range(3):
        next(fresh)
    state = fresh.state_dict()
    resumed = ExampleStream(split, ids, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert torch.cat([next(resumed)["labels"] for _ in range(2)]).tolist() == first[12:]
    assert ExampleStream(split, ids, 4, seed=4).__next__()["labels"].tolist() != first[:4]
    with pytest.raises(ValueError, match="batch_size"):
        ExampleStream(split, ids, batch_size=5, seed=3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- encoder
def test_minilm_loads_with_a_fresh_head_and_bert_projection_targets():
    from gradspace import select_params
    from gradspace.train.encoder import load_encoder, max_rank, projection_targets

    torch.manual_seed(0)
    model, tok = load_encoder("minilm", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    assert sum(p.numel() for p in model.parameters()) > 22_000_000 and len(tok) == 30522
    targets = projection_targets(model)
    groups = select_params(model, targets, rank=8)
    names = groups[0]["param_names"]
    assert len(names) == 6 * 6 and max_rank(model, targets) == 384
    assert {n.split(".")[-2] for n in names} == {"query", "key", "value", "dense"}
    assert not any("classifier" in n or "pooler" in n for n in names)
    torch.manual_seed(0)
    again, _ = load_encoder("minilm", num_labels=3)
    assert torch.equal(again.classifier.weight, model.classifier.weight)  # the head depends only on the seed
    reg, _ = load_encoder("minilm", num_labels=1, regression=True)
    assert reg.config.problem_type == "regression" and reg.classifier.out_features == 1


# ---------------------------------------------------------------------------------------------- runs
def test_finetune_learns_a_separable_task(tmp_path, sentiment_csv, capsys):
    out = tmp_path / "run"
    assert (
        run(
            "finetune",
            "--task",
            sentiment_csv,
            "--method",
            "galore",
            "--steps",
            "12",
            "--lr",
            "3e-4",
            "--eval-every",
            "6",
            "--update-gap",
            "6",
            *FAST,
            "--out",
            out,
        )
        == 0
    )
    recs = lines(out / "metrics.jsonl")
    loss = [r["loss"] for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert len(loss) == 12 and [e["step"] for e in evals] == [6, 12]
    assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "f1" and summary["f1"] == evals[-1]["f1"] and summary["accuracy"] >= 0.8
    assert summary["rank"] == 8 and summary["scale"] == 2.0 and len(summary["weights"]) == 36
    assert all(w["rank"] == 8 for w in summary["weights"].values())
    assert "validation f1" in capsys.readouterr().out
    (ckpt,) = list_checkpoints(out / "checkpoints")
    state = load_checkpoint(ckpt)
    assert state["step"] == 12 and state["stream"]["step"] == 12 and state["config"]["task"] == str(sentiment_csv)


@pytest.mark.parametrize("task", sorted(BUILTIN))
def test_finetune_runs_on_every_builtin_task(tmp_path, task):
    out = tmp_path / task
    assert (
        run(
            "finetune",
            "--task",
            task,
            "--method",
            "subtrack",
            "--steps",
            "3",
            "--eval-batches",
            "1",
            "--eval-every",
            "0",
            *FAST,
            "--out",
            out,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    value = summary[summary["metric"]]
    assert summary["task"] == task and math.isfinite(summary["val_loss"]) and -1 <= value <= 1
    assert summary["evals"][-1]["step"] == 3


def test_interrupt_and_resume_is_bit_identical(tmp_path, sentiment_csv, capsys):
    # a subspace update (every 2 steps) and an evaluation fall after the resumed step
    args = [
        "finetune",
        "--task",
        sentiment_csv,
        "--method",
        "galore",
        "--steps",
        "4",
        "--update-gap",
        "2",
        "--lr",
        "1e-4",
        "--eval-every",
        "2",
        *FAST,
    ]
    assert run(*args, "--out", tmp_path / "full") == 0
    assert run(*args, "--out", tmp_path / "cut", "--stop-after", "2") == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2" in err and "gradspace finetune --resume" in err
    assert run("finetune", "--resume", tmp_path / "cut", "--threads", "1") == 0
    full = load_checkpoint(list_checkpoints(tmp_path / "full" / "checkpoints")[-1])
    cut = load_checkpoint(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1])
    assert full["step"] == cut["step"] == 4
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k

    def curve(run_dir):
        return [
            (r["type"], r["step"], r.get("loss"), r.get("val_loss"), r.get("f1"))
            for r in lines(run_dir / "metrics.jsonl")
        ]

    assert curve(tmp_path / "full") == curve(tmp_path / "cut")
    assert_clean_error(capsys, run("pretrain", "--resume", tmp_path / "cut"), "gradspace finetune")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["finetune", "--task", "no-such-task"], ["unknown task"]),
        (["finetune", "--task", "@missing.csv"], ["does not exist"]),
        (["finetune", "--task", "@nolabel.csv"], ["no label column"]),
        (["finetune", "--task", "@good.csv", "--rank", "385"], ["rank 385", "maximum allowed is 384"]),
        (["finetune", "--task", "@good.csv", "--method", "adamw", "--rank", "8"], ["does not apply"]),
        (["finetune", "--task", "@good.csv", "--max-length", "4096"], ["max-length 4096", "512"]),
        (["finetune", "--task", "@good.csv", "--model", "@no-model-here/"], ["model"]),
        (["finetune", "--method", "nope"], ["unknown method"]),
        (["compare", "--task", "@good.csv", "--dataset", "bible"], ["--dataset", "fine-tuning"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
    (tmp_path / "nolabel.csv").write_text("text,stars\ngood,5\nbad,1\n")
    (tmp_path / "good.csv").write_text("text,label\ngood,1\nbad,0\nfine,1\n")
    out = tmp_path / "out"
    argv = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    assert_clean_error(capsys, run(*argv, "--out", out), *words)
    assert not out.exists()


def test_hub_model_offline_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from gradspace.train import encoder

    monkeypatch.setattr(encoder, "hub_reachable", lambda: False)  # also on machines that have a network
    (tmp_path / "good.csv").write_text("text,label\ngood,1\nbad,0\n")
    code = run(
        "finetune", "--task", tmp_path / "good.csv", "--model", "no-such-org/no-such-model", "--out", tmp_path / "out"
    )
    assert_clean_error(capsys, code, "no-such-org/no-such-model", "not reachable")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compare_on_a_task_reports_the_metric_per_method(tmp_path, sentiment_csv, capsys):
    out = tmp_path / "cmp"
    assert (
        run("compare", "--task", sentiment_csv, "--methods", "adamw,galore", "--steps", "3", *FAST, "--out", out) == 0
    )
    report = (out / "report.md").read_text()
    assert "| method | lr | val f1 | vs adamw | val loss |" in report
    assert "| galore |" in report and "fine-tuned on" in report
    raw = json.loads((out / "metrics.json").read_text())["results"]
    assert raw["galore"]["state_bytes"] < raw["adamw"]["state_bytes"]
    assert all(r["peak_memory"] > 50 * 2**20 and r["metric"] == "f1" for r in raw.values())
    for m in ("adamw", "galore"):
        assert json.loads((out / m / "summary.json").read_text())["f1"] == raw[m]["f1"]
    printed = capsys.readouterr().out
    assert "val f1" in printed and "galore" in printed


def test_a_held_out_file_or_a_folder_validates_a_task_file(tmp_path, sentiment_csv):
    rows = sentiment_csv.read_text().splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": f"the film was {w}", "label": y}) + "\n" for w, y in HELD_OUT))
    task = load_task(str(sentiment_csv), held)
    assert (len(task.train), len(task.validation)) == (len(rows) - 1, len(HELD_OUT))  # trains on every row
    assert task.validation.text[0] == "the film was great" and task.labels == ["0", "1"]
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "train.csv").write_text(sentiment_csv.read_text())
    (folder / "valid.jsonl").write_text(held.read_text())
    again = load_task(str(folder))
    assert again.validation.text == task.validation.text and again.train.label == task.train.label
    (folder / "test.csv").write_text("text,label\nx,1\n")
    with pytest.raises(ValueError, match=r"one train\.\* and one valid"):
        load_task(str(folder))
    held.write_text(json.dumps({"text": "a", "label": 7}) + "\n")
    with pytest.raises(ValueError, match=r"label\(s\) 7 that no training row has"):
        load_task(str(sentiment_csv), held)
    with pytest.raises(ValueError, match="built-in and GLUE tasks have their own"):
        load_task("trec", held)


def test_finetune_eval_dataset_from_the_command_line(tmp_path, sentiment_csv, capsys):
    held = tmp_path / "held.csv"
    held.write_text("text,label\n" + "".join(f"the film was {w},{y}\n" for w, y in HELD_OUT))
    args = ["finetune", "--task", sentiment_csv, "--eval-dataset", held, "--steps", "2", *FAST]
    assert run(*args, "--out", tmp_path / "run") == 0
    said = capsys.readouterr()
    assert f"96 train / {len(HELD_OUT)} validation examples" in said.out + said.err
    assert run("finetune", "--task", "trec", "--eval-dataset", held, "--steps", "2", *FAST) == 2


def test_an_encoder_fine_tunes_with_int8_weights_and_resumes_bit_identically(tmp_path, sentiment_csv):
    args = ["finetune", "--task", sentiment_csv, "--method", "galore", "--steps", "4", "--update-gap", "2"]
    args += ["--lr", "1e-4", "--eval-every", "2", "--dtype", "int8", *FAST]
    assert run(*args, "--out", tmp_path / "full") == 0
    assert run(*args, "--out", tmp_path / "cut", "--stop-after", "2") == 130
    assert run("finetune", "--resume", tmp_path / "cut", "--threads", "1") == 0
    full, cut = (load_checkpoint(list_checkpoints(tmp_path / r / "checkpoints")[-1])["model"] for r in ("full", "cut"))
    int8 = [k for k, v in full.items() if v.dtype == torch.int8]
    assert int8 and all(k + "_scales" in full for k in int8)  # the encoder's linear weights, stored in 8 bits
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert (tmp_path / "full" / "model" / "config.json").is_file()
