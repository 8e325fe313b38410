"""What a run leaves that other tools can use: a Hugging Face model folder (``save_pretrained`` safetensors, config,
tokenizer) in ``RUN/model``, which ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` and
``AutoTokenizer`` load with ``from_pretrained`` and ``generate`` uses.

Pretraining vocabularies:

- ``--tokenizer chars``: the model as trained, with a fast character tokenizer (one token per character; a
  character outside the training text maps to the space);
- GPT-2 BPE with ``--full-vocab`` or a streamed dataset: the model and GPT-2's tokenizer as they are;
- GPT-2 BPE compacted to the corpus's tokens (the default): the embedding (and head) are scattered back into GPT-2's
  50,257 rows, so GPT-2's own tokenizer fits; the rows of tokens the corpus never uses are zero, and
  ``generation_config.json`` lists them in ``suppress_tokens`` so that ``generate`` never emits them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MODEL_DIR = "model"


def char_tokenizer(chars: str):
    """A ``PreTrainedTokenizerFast`` whose token i is the character ``chars[i]``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(chars)}
    unk = " " if " " in vocab else chars[0]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, clean_up_tokenization_spaces=False)


def _full_vocabulary(model, vocab_map: torch.Tensor, size: int):
    """``model`` over ``size`` tokenizer ids: row ``vocab_map[i]`` = the trained row i, others zero. Built on the
    meta device and given the trained tensors themselves (``assign``), so only the two widened matrices are new
    memory: a second full model would double a 1B run's peak while it saves."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.vocab_size = size
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and value.shape[0] == vocab_map.numel():
            rows = torch.zeros(size, value.shape[1], dtype=value.dtype)
            rows[vocab_map.long()] = value.detach().cpu()
            value = rows
        state[key] = value.detach()
    full.load_state_dict(state, strict=False, assign=True)  # a tied head shares the embedding's rows
    full.tie_weights()
    trained = dict(model.named_buffers())  # non-persistent ones (rotary frequencies) are not in the state dict
    for name, buf in list(full.named_buffers()):
        if buf.is_meta and name in trained:
            owner, _, attr = name.rpartition(".")
            full.get_submodule(owner)._buffers[attr] = trained[name]
    left = [n for n, t in [*full.named_parameters(), *full.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"export: no trained values for {', '.join(left[:5])}")
    return full


def export_causal_lm(folder: Path, model, dataset, tokenizer=None) -> Path:
    """``folder/model``: the pretrained model with a tokenizer that fits it (see the module docstring)."""
    from transformers import GenerationConfig

    out = Path(folder) / MODEL_DIR
    chars = getattr(dataset, "chars", None)
    vocab_map = getattr(dataset, "vocab_map", None)
    suppress: list[int] = []
    if chars is not None:
        tok = char_tokenizer(chars)
        export = model
    else:
        from . import assets

        tok = tokenizer or assets.tokenizer()
        export = model
        if vocab_map is not None:
            export = _full_vocabulary(model, vocab_map, len(tok))
            seen = torch.zeros(len(tok), dtype=torch.bool)
            seen[vocab_map.long()] = True
            suppress = torch.nonzero(~seen).flatten().tolist()
    export.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    eos = tok.eos_token_id
    gen = GenerationConfig(
        suppress_tokens=suppress or None,
        eos_token_id=eos if eos is not None and eos not in suppress else None,
        pad_token_id=eos if eos is not None and eos not in suppress else None,
        do_sample=True,
        temperature=0.8,
        top_k=50,
    )
    gen.save_pretrained(out)
    (out / "gradspace.json").write_text(
        json.dumps({"vocabulary": "chars" if chars else "gpt2", "trained_tokens": len(tok) - len(suppress)}, indent=1)
    )
    return out


def export_classifier(folder: Path, model, tokenizer) -> Path:
    """``folder/model``: the fine-tuned classifier (or regressor) and its tokenizer."""
    out = Path(folder) / MODEL_DIR
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def sample(folder: Path, prompt: str, max_new_tokens: int = 100, seed: int = 0, **generate: Any) -> str:
    """Text that the exported model of a run folder (or a model folder) writes after ``prompt``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import UsageError

    path = Path(folder)
    path = path / MODEL_DIR if (path / MODEL_DIR).is_dir() else path
    if not (path / "config.json").exists():
        raise UsageError(
            f"{folder} holds no model: give the run folder of a finished `gradspace pretrain` (it "
            f"writes {Path(folder) / MODEL_DIR}) or a Hugging Face model folder"
        )
    if max_new_tokens < 1 or not generate.get("temperature", 1.0) > 0:
        raise UsageError("--max-new-tokens must be >= 1 and --temperature > 0")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    out = model.generate(ids, max_new_tokens=max_new_tokens, **generate)
    return tok.decode(out[0], skip_special_tokens=True)
