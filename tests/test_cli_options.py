"""The training options of `gradspace pretrain|finetune`: each reaches the optimizer, schedule or model it names,
is recorded in config.json, and a bad or misspelled one is a one-line error that says what to change."""

import json

import pytest
import torch

from conftest import lines, run
from gradspace.train.checkpoint import list_checkpoints, load_checkpoint
from test_cli import SMALL, assert_clean_error


def last_checkpoint(folder):
    return load_checkpoint(list_checkpoints(folder / "checkpoints")[-1])


def final_weights(folder):
    return last_checkpoint(folder)["model"]


def test_weight_decay_scheduler_and_warmup_are_honoured_and_recorded(tmp_path):
    out = tmp_path / "run"
    args = ["--method", "galore", "--lr", "0.01", "--weight-decay", "0.1", "--scheduler", "linear", "--warmup", "2"]
    assert run("pretrain", *SMALL, *args, "--out", out) == 0
    lrs = [r["lr"] for r in lines(out / "metrics.jsonl") if r["type"] == "train"]
    # transformers' linear schedule: lr * t / warmup, then lr * (steps - t) / (steps - warmup), t = 0 .. 5
    assert lrs == pytest.approx([0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025])
    groups = last_checkpoint(out)["optimizer"]["param_groups"]
    assert all(g["weight_decay"] == 0.1 for g in groups)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["weight_decay"], cfg["scheduler"], cfg["warmup"]) == (0.1, "linear", 2)


def test_optim_args_target_modules_and_proj_type_reach_the_optimizer(tmp_path):
    out = tmp_path / "run"
    args = [
        "--method",
        "subtrack",
        "--optim-args",
        "eta=0.5,accumulate=false",
        "--target-modules",
        "gate_proj",
        "--proj-type",
        "left",
        "--update-proj-gap",
        "3",
    ]
    assert run("pretrain", *SMALL, *args, "--out", out) == 0
    saved = last_checkpoint(out)["optimizer"]
    projected = [g for g in saved["param_groups"] if "rank" in g]
    assert len(projected) == 1 and projected[0]["eta"] == 0.5 and projected[0]["accumulate"] is False
    assert projected[0]["update_proj_gap"] == 3 and projected[0]["proj_type"] == "left"
    assert all(n.endswith("gate_proj.weight") for n in projected[0]["param_names"])
    bases = [st["basis"] for st in saved["state"].values() if "basis" in st]
    assert bases and all(b.shape == (172, 16) for b in bases)  # gate_proj is 172 x 64: "left" projects its rows


def test_bad_training_options_are_one_line_errors(tmp_path, capsys):
    for bad, words in [
        (["--method", "galore", "--optim-args", "eta=0.5"], ("eta", "tracker subtrack")),
        (["--optim-args", "eta"], ("key=value",)),
        (["--weight-decay", "-1"], ("weight-decay", ">= 0")),
        (["--grad-clip", "-0.5"], ("grad-clip",)),
        (["--warmup", "6"], ("warmup", "shorter")),
        (["--layerwise"], ("--grad-clip 0",)),
        (["--target-modules", "q_projection"], ("q_proj",)),
    ]:
        code = run("pretrain", *SMALL, *bad, "--out", tmp_path / "bad")
        assert_clean_error(capsys, code, *words)
        assert not (tmp_path / "bad").exists()


def test_a_misspelled_option_names_the_right_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        from gradspace import cli

        cli.main(["pretrain", "--updte-gap", "3"])
    assert exit_.value.code == 2 and "did you mean --update-gap?" in capsys.readouterr().err


def test_layerwise_and_gradient_checkpointing_train_as_the_normal_run(tmp_path):
    base = [*SMALL, "--method", "galore", "--grad-clip", "0", "--update-proj-gap", "2"]
    assert run("pretrain", *base, "--out", tmp_path / "normal") == 0
    assert run("pretrain", *base, "--layerwise", "--out", tmp_path / "layerwise") == 0
    assert run("pretrain", *base, "--grad-checkpointing", "--out", tmp_path / "ckpt") == 0
    normal = final_weights(tmp_path / "normal")
    for other in ("layerwise", "ckpt"):
        got = final_weights(tmp_path / other)
        for key, value in normal.items():
            torch.testing.assert_close(
                got[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key, o=other: f"{o} {k}: {m}"
            )
    assert json.loads((tmp_path / "layerwise" / "config.json").read_text())["layerwise"] is True


def test_compile_trains(tmp_path):
    out = tmp_path / "run"
    assert (
        run(
            "pretrain",
            "--steps",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--eval-batches",
            "1",
            "--threads",
            "1",
            "--method",
            "galore",
            "--compile",
            "--out",
            out,
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_resume_refuses_a_different_lr_or_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--lr", "0.003", "--out", out) == 0
    for changed in (["--lr", "0.1"], ["--scheduler", "constant"], ["--weight-decay", "0.5"]):
        code = run("pretrain", "--resume", out, "--steps", "8", *changed, "--threads", "1")
        assert_clean_error(capsys, code, changed[0][2:].replace("-", "_"))
    assert run("pretrain", "--resume", out, "--steps", "8", "--threads", "1") == 0  # more steps: allowed


def test_console_eval_lines_window_mean_loss_and_run_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--log-every", "3", "--out", out) == 0
    err = capsys.readouterr().err
    assert "step 3: val_loss" in err and "step 6: val_loss" in err
    train = [r for r in lines(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    history = json.loads((out / "summary.json").read_text())["history"]
    assert train[0]["loss"] == pytest.approx(sum(h["loss"] for h in history[:3]) / 3)  # the window's mean
    assert (out / "curves.png").stat().st_size > 1000 and (out / "energy.png").exists()


def test_report_to_a_missing_package_is_an_error_before_anything_is_written(tmp_path, capsys):
    import importlib.util

    for name in ("tensorboard", "wandb"):
        code = run("pretrain", *SMALL, "--report-to", name, "--out", tmp_path / name)
        if importlib.util.find_spec(name) is None:
            assert_clean_error(capsys, code, f"pip install {name}")
            assert not (tmp_path / name).exists()
        else:
            assert code == 0 and any((tmp_path / name).rglob("*events*" if name == "tensorboard" else "*.wandb"))
    assert_clean_error(capsys, run("pretrain", *SMALL, "--report-to", "mlflow", "--out", tmp_path / "x"), "mlflow")


def test_eval_dataset_validates_on_the_held_out_file(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("To be, or not to be, that is the question. " * 200)
    (tmp_path / "held.txt").write_text("Whether 'tis nobler in the mind to suffer the slings. " * 60)
    out = tmp_path / "run"
    args = ["--dataset", tmp_path / "train.txt", "--eval-dataset", tmp_path / "held.txt", "--tokenizer", "chars"]
    assert run("pretrain", *SMALL, *args, "--out", out) == 0
    held = len((tmp_path / "held.txt").read_text())
    assert f"/ {held:,} validation tokens" in capsys.readouterr().err
    assert_clean_error(
        capsys,
        run("pretrain", *SMALL, "--eval-dataset", tmp_path / "nope.txt", "--out", tmp_path / "bad"),
        "--eval-dataset",
        "no such file",
    )


def test_a_presets_own_rank_and_scale_replace_the_commands_defaults(tmp_path):
    """APOLLO-Mini trains at its rank 1 and scale 128 from the command line; GaLore keeps the command's; a --scale
    or --rank the user gives wins."""
    for method, extra, want in (
        ("apollo-mini", [], (1, 128.0)),
        ("apollo", [], (16, 1.0)),
        ("galore", [], (16, 0.25)),
        ("apollo-mini", ["--rank", "2", "--scale", "64"], (2, 64.0)),
    ):
        out = tmp_path / f"{method}{len(extra)}"
        assert run("pretrain", *SMALL, "--method", method, *extra, "--out", out) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["rank"], summary["scale"]) == want, method
        assert {w["rank"] for w in summary["weights"].values()} == {want[0]}
        group = next(g for g in last_checkpoint(out)["optimizer"]["param_groups"] if "rank" in g)
        assert (group["rank"], group["scale"]) == want


def test_the_large_model_options_work_together(tmp_path):
    """The command line for a model that AdamW cannot fit: layer-wise, gradient checkpointing, the 8-bit rule,
    randomized SVD, staggered updates, an int8 basis and bfloat16 weights, in one run, and resumed."""
    out = tmp_path / "big"
    args = [
        *SMALL,
        "--method",
        "galore",
        "--base",
        "adamw8bit",
        "--layerwise",
        "--grad-checkpointing",
        "--grad-clip",
        "0",
        "--svd",
        "randomized",
        "--optim-args",
        "update_stagger=true,basis_dtype=int8",
        "--dtype",
        "bfloat16",
        "--update-proj-gap",
        "3",
    ]
    assert run("pretrain", *args, "--out", out) == 0
    saved = last_checkpoint(out)["optimizer"]
    group = next(g for g in saved["param_groups"] if "rank" in g)
    assert (group["base"], group["svd"], group["update_stagger"], group["basis_dtype"]) == (
        "adamw8bit",
        "randomized",
        True,
        "int8",
    )
    states = [st for st in saved["state"].values() if "basis" in st]
    assert states and all(st["basis"].dtype == torch.int8 for st in states)
    assert len({st["phase"] for st in states}) == 3  # staggered over the gap of 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] < summary["history"][0]["loss"]
