"""A run leaves a Hugging Face model folder that other tools load: from_pretrained, the same predictions as the
trained model, generate, and `gradspace sample`."""

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import run
from gradspace.train.checkpoint import list_checkpoints, load_checkpoint
from gradspace.train.data import TokenDataset
from gradspace.train.models import build_llama
from test_cli import SMALL
from test_finetune import FAST, sentiment_csv  # noqa: F401 - the fixture


def trained(out, vocab_size):
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    model = build_llama("tiny", vocab_size=vocab_size)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def test_a_compact_vocabulary_run_exports_gpt2_sized_with_unused_tokens_suppressed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--method", "galore", "--out", out) == 0
    data = TokenDataset.from_corpus("shakespeare", compact=True)
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == len(tok) == 50257
    ids = data.train[:24].long()[None]
    with torch.no_grad():
        ref = trained(out, data.vocab_size)(input_ids=ids).logits
        got = model(input_ids=data.to_tokenizer_ids(ids).long()).logits
    torch.testing.assert_close(got[..., data.vocab_map.long()], ref, rtol=1e-5, atol=1e-5)
    prompt = tok("ROMEO:", return_tensors="pt").input_ids
    new = model.generate(prompt, max_new_tokens=8, do_sample=True)[0, prompt.shape[1] :]
    assert torch.isin(new, data.vocab_map).all()  # only tokens the model was trained on
    capsys.readouterr()
    assert run("sample", out, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--threads", "1") == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_a_character_run_exports_a_character_tokenizer(tmp_path):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--tokenizer", "chars", "--method", "adamw", "--out", out) == 0
    data = TokenDataset.from_chars("shakespeare")
    tok = AutoTokenizer.from_pretrained(out / "model")
    text = data.decode(data.train[:80])
    assert tok(text).input_ids == data.train[:80].tolist() and tok.decode(tok(text).input_ids) == text
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = data.train[:32].long()[None]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained(out, data.vocab_size)(input_ids=ids).logits)


def test_a_finetuning_run_exports_its_classifier(tmp_path, sentiment_csv):  # noqa: F811
    out = tmp_path / "run"
    assert run("finetune", "--task", sentiment_csv, "--method", "galore", "--steps", "3", *FAST, "--out", out) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    saved = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert model(**tok(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)
