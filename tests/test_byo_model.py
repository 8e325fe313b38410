"""Bring your own model: `gradspace pretrain --model FOLDER` trains a local Hugging Face causal LM (here a GPT-2,
whose Conv1D weights are projected), continued from its weights or fresh, and writes it back as a model folder."""

import json

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from conftest import run
from gradspace.train import assets
from test_cli import assert_clean_error
from test_finetune import FAST, sentiment_csv  # noqa: F401 - the fixture

ARGS = [
    "--steps",
    "3",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--log-every",
    "1",
    "--eval-batches",
    "1",
    "--threads",
    "1",
    "--method",
    "galore",
]


def gpt2_folder(path):
    torch.manual_seed(123)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50257))
    model.save_pretrained(path)
    assets.tokenizer().save_pretrained(path)
    return model


def moved(folder, saved):
    """Relative distance of a run's exported weights from the saved model's (3 small steps move them little)."""
    got = AutoModelForCausalLM.from_pretrained(folder / "model").state_dict()
    ref = saved.state_dict()
    return max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref if k.endswith("c_fc.weight"))


def test_pretrain_continues_a_local_gpt2_and_exports_it(tmp_path):
    folder = tmp_path / "gpt2"
    saved = gpt2_folder(folder)
    out = tmp_path / "run"
    assert run("pretrain", "--model", folder, *ARGS, "--out", out) == 0
    assert 0 < moved(out, saved) < 0.2  # trained on from the saved weights
    weights = json.loads((out / "summary.json").read_text())["weights"]
    assert any("c_attn" in n for n in weights) and all(w["rank"] == 8 for w in weights.values())  # d/4
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=3, do_sample=False).shape[1] > 2
    fresh = tmp_path / "fresh"
    assert run("pretrain", "--model", folder, "--fresh", *ARGS, "--out", fresh) == 0
    assert moved(fresh, saved) > 0.8  # a fresh initialisation, unrelated to the saved one


def test_a_missing_model_or_tokenizer_is_a_one_line_error(tmp_path, capsys):
    assert_clean_error(
        capsys,
        run("pretrain", "--model", tmp_path / "nope", *ARGS, "--out", tmp_path / "r"),
        "--model",
        "no such folder",
    )
    assert_clean_error(
        capsys, run("pretrain", "--tokenizer", tmp_path / "nope", *ARGS, "--out", tmp_path / "r"), "unknown tokenizer"
    )
    assert not (tmp_path / "r").exists()


def test_finetune_takes_a_gpt2_style_model_too(tmp_path, sentiment_csv):  # noqa: F811
    folder = tmp_path / "gpt2"
    gpt2_folder(folder)
    out = tmp_path / "ft"
    assert (
        run(
            "finetune",
            "--model",
            folder,
            "--task",
            sentiment_csv,
            "--method",
            "galore",
            "--rank",
            "4",
            "--steps",
            "3",
            *FAST,
            "--out",
            out,
        )
        == 0
    )
    weights = json.loads((out / "summary.json").read_text())["weights"]
    assert weights and all(n.split(".")[-2] in ("c_attn", "c_proj", "c_fc") for n in weights)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.pad_token_id == 50256
