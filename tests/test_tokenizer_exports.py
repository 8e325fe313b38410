"""Every tokenizer a run exports gives back the text it encodes, through AutoTokenizer and the text-generation
pipeline, with special tokens skipped or not (`gradspace sample` and the pipeline skip them); and `gradspace sample`
decodes greedily at --temperature 0 and starts from nothing with --prompt ''."""

import csv
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from conftest import run
from test_finetune import BAD, GOOD, SUBJECTS

TEXT = (
    "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!  O Romeo, Romeo, wherefore art thou?\n\n"
) * 30
FAST = ["--steps", "2", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--threads", "1"]
FAST += ["--log-every", "1", "--method", "adamw"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chars_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("chars") / "run"
    assert run("pretrain", "--dataset", corpus, "--tokenizer", "chars", *FAST, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("gpt2") / "run"
    assert run("pretrain", "--dataset", corpus, *FAST, "--out", out) == 0  # GPT-2 BPE, compacted
    return out


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft")
    task = folder / "sentiment.csv"
    with task.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for words, y in ((GOOD, 1), (BAD, 0)):
            w.writerows([f"{s} was {a}", y] for s, a in itertools.product(SUBJECTS, words))
    out = folder / "run"
    args = ["--batch-size", "8", "--max-length", "16", "--threads", "1", "--steps", "2", "--method", "adamw"]
    assert run("finetune", "--task", task, *args, "--out", out) == 0
    return out


def sample(capsys, folder, *argv):
    capsys.readouterr()
    assert run("sample", folder, "--threads", "1", *argv) == 0
    return capsys.readouterr().out.removesuffix("\n")  # print's own newline


def test_every_exported_tokenizer_round_trips_with_or_without_special_tokens(chars_run, gpt2_run, classifier_run):
    texts = [TEXT[:300], "ROMEO:  to be or not\n\nto be", " \n leading and trailing \n "]
    for folder in (chars_run, gpt2_run):  # text-generation exports: exact text back
        tok = AutoTokenizer.from_pretrained(folder / "model")
        for text in texts:
            for skip in (True, False):
                assert tok.decode(tok(text).input_ids, skip_special_tokens=skip) == text, (folder.name, skip)
    chars = AutoTokenizer.from_pretrained(chars_run / "model")
    every = "".join(sorted(set(TEXT)))
    assert chars.decode(chars(every).input_ids, skip_special_tokens=True) == every  # every trained character
    assert chars.all_special_tokens == []
    # the classifier's tokenizer (MiniLM: lower-cased WordPiece) normalises text as it trained on it; skipping special
    # tokens drops only the [CLS] and [SEP] that encoding added
    tok = AutoTokenizer.from_pretrained(classifier_run / "model")
    for text in ["the movie was wonderful", "ROMEO: to be, or not!"]:
        plain = tok.decode(tok(text, add_special_tokens=False).input_ids)
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == plain
        assert tok.decode(tok(text).input_ids) == f"{tok.cls_token} {plain} {tok.sep_token}"
    assert tok.decode(tok("the movie was wonderful").input_ids, skip_special_tokens=True) == "the movie was wonderful"


def test_a_character_outside_the_trained_ones_encodes_and_decodes_as_the_space(chars_run):
    tok = AutoTokenizer.from_pretrained(chars_run / "model")
    ids = tok("Romeo, thé∆!").input_ids
    assert len(ids) == len("Romeo, thé∆!")  # one token per character, none dropped
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == "Romeo, th  !"


def test_the_text_generation_pipeline_keeps_the_spaces_a_character_model_writes(chars_run):
    folder = chars_run / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    space = tok.convert_tokens_to_ids(" ")
    pipe = pipeline("text-generation", model=str(folder))
    forced = {"max_new_tokens": 4, "do_sample": False, "sequence_bias": [[[space], 100.0]]}  # it writes spaces
    assert pipe("ROMEO: to be", **forced)[0]["generated_text"] == "ROMEO: to be    "
    assert pipe("ROMEO: to be", return_full_text=False, **forced)[0]["generated_text"] == "    "


def test_sample_prints_a_character_prompt_with_its_spaces(chars_run, capsys):
    assert sample(capsys, chars_run, "--prompt", "ROMEO: to be or not", "--max-new-tokens", "5").startswith(
        "ROMEO: to be or not"
    )


def test_temperature_zero_is_greedy_decoding(chars_run, gpt2_run, capsys):
    for folder in (chars_run, gpt2_run):
        one = sample(capsys, folder, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "6")
        other = sample(
            capsys, folder, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "6", "--seed", "7"
        )
        model = AutoModelForCausalLM.from_pretrained(folder / "model")
        tok = AutoTokenizer.from_pretrained(folder / "model")
        ids = tok("ROMEO:", return_tensors="pt").input_ids
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert one == other == tok.decode(greedy[0], skip_special_tokens=True)
    assert run("sample", chars_run, "--temperature", "-1") == 2


def test_an_empty_prompt_starts_from_a_newline_or_the_start_token(chars_run, gpt2_run, capsys):
    text = sample(capsys, chars_run, "--prompt", "", "--max-new-tokens", "5", "--temperature", "0")
    tok = AutoTokenizer.from_pretrained(chars_run / "model")
    model = AutoModelForCausalLM.from_pretrained(chars_run / "model")
    start = torch.tensor([tok("\n").input_ids])  # the chars tokenizer has no BOS or EOS token
    greedy = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=5, do_sample=False)
    assert text == tok.decode(greedy[0, 1:]) and len(text) == 5  # only what the model wrote
    # GPT-2 compacted: <|endoftext|> never occurred in training (suppressed), so it starts from a newline too
    assert sample(capsys, gpt2_run, "--prompt", "", "--max-new-tokens", "4")
