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

from ..int8_weights import SCALES_SUFFIX, dequantized, is_int8

MODEL_DIR = "model"


#: the flags of ``gradspace sample``
SAMPLE = [
    (["run"], {"help": "a run folder (its model/ folder) or a Hugging Face model folder"}),
    (
        ["--prompt"],
        {
            "default": "\n",
            "help": "the text to continue (a newline); '' starts from the tokenizer's BOS (else EOS) token, or a "
            "newline where it has none (--tokenizer chars) or the model never trained on it, and prints only the "
            "new text",
        },
    ),
    (["--max-new-tokens"], {"type": int, "default": 200}),
    (
        ["--temperature"],
        {"type": float, "default": 0.8, "help": "sampling temperature (0.8); 0: greedy decoding (do_sample=False)"},
    ),
    (["--seed"], {"type": int, "default": 0}),
    (["--threads"], {"type": int, "default": 0}),
    (
        ["--raw"],
        {
            "action": "store_true",
            "help": "continue the prompt as text even when the model's tokenizer has a chat template (by default "
            "the prompt is a user turn in that format, and the answer is printed)",
        },
    ),
]


def char_tokenizer(chars: str):
    """A ``PreTrainedTokenizerFast`` whose token i is the character ``chars[i]``, with no special tokens: the
    space (else ``chars[0]``) is only the backend's unknown token, so that ``decode(ids, skip_special_tokens=True)``
    (``generate`` pipelines, ``gradspace sample``) gives back every trained character, spaces and newlines included.

    Training never meets an unknown character (the vocabulary is every character of the training and validation
    text); a character outside it, in a prompt, encodes as the space, and decodes as one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(chars)}
    unk = " " if " " in vocab else chars[0]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


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
    for key, value in float_state(model).items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and value.shape[0] == vocab_map.numel():
            rows = torch.zeros(size, value.shape[1], dtype=value.dtype)
            rows[vocab_map.long()] = dequantized(value).detach().cpu()
            value = rows
        state[key] = value.detach()  # an int8 weight itself (assigned: no float copy)
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


#: an int8 model's export shard: dequantised, and copied once more by safetensors while it is written
SHARD_BYTES = 2**29


def float_state(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each int8 weight as itself (an ``Int8Weight``, whose values are read when
    needed) instead of its codes and scales: the state a float model of the same architecture loads."""
    int8 = {n: p for n, p in model.named_parameters() if is_int8(p)}
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(SCALES_SUFFIX) and key[: -len(SCALES_SUFFIX)] in int8:
            continue
        state[key] = int8[key].detach() if key in int8 else value
    return state


def save_dequantized(model, folder: Path) -> None:
    """A model with int8 weights as a Hugging Face folder of dequantised weights (the compute dtype), in safetensors
    shards of at most :data:`SHARD_BYTES` (512 MiB), each dequantised only while its shard is written: at 7B the
    model is 6.5 GB in int8 and would be 13 more as one bfloat16 state dict."""
    from safetensors.torch import save_file

    state, seen = float_state(model), set()
    shards: list[list[str]] = [[]]
    size, total = 0, 0
    for key, value in state.items():
        ident = id(value) if is_int8(value) else value.data_ptr()
        if ident in seen:  # a tied weight: saved once, as save_pretrained does
            continue
        seen.add(ident)
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
        total += nbytes
    n = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {k: dequantized(state[k]).detach().contiguous().cpu() for k in keys}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)


def export_causal_lm(folder: Path, model, dataset, tokenizer=None, step: int | None = None) -> Path:
    """``folder/model``: the pretrained model of ``step`` with a tokenizer that fits it (see the module docstring),
    written whole or not at all (see :func:`_written`)."""
    from transformers import GenerationConfig

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
    eos = tok.eos_token_id
    gen = GenerationConfig(
        suppress_tokens=suppress or None,
        eos_token_id=eos if eos is not None and eos not in suppress else None,
        pad_token_id=eos if eos is not None and eos not in suppress else None,
        do_sample=True,
        temperature=0.8,
        top_k=50,
    )
    info = {"vocabulary": "chars" if chars else "gpt2", "trained_tokens": len(tok) - len(suppress)}
    return _written(folder, export, tok, step, {"kind": "causal-lm", **info}, gen)


def export_classifier(folder: Path, model, tokenizer, step: int | None = None, labels=()) -> Path:
    """``folder/model``: the fine-tuned classifier (or regressor) of ``step`` and its tokenizer; with the task's
    class names as ``id2label``, so that ``pipeline("text-classification")`` answers with them."""
    if labels and len(labels) == model.config.num_labels:
        model.config.id2label = dict(enumerate(map(str, labels)))
        model.config.label2id = {str(name): i for i, name in enumerate(labels)}
    return _written(folder, model, tokenizer, step, {"kind": "classifier"})


#: written last into an exported folder: what it holds and the training step it is the model of
MARKER = "gradspace.json"


def _written(folder: Path, model, tokenizer, step: int | None, info: dict[str, Any], generation=None) -> Path:
    """``folder/model`` from ``save_pretrained`` into a temp folder that replaces it only once complete: a kill or a
    full disk during the write leaves the previous export (or none), never a folder that half loads."""
    from .atomic import atomic_folder

    out = Path(folder) / MODEL_DIR
    with atomic_folder(out, "the model folder") as tmp:
        if any(is_int8(p) for p in model.parameters()):
            save_dequantized(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if generation is not None:
            generation.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({**info, "step": step}, indent=1))
    return out


def exported_step(folder: Path) -> int | None:
    """The training step whose model ``folder/model`` holds, or None when there is no complete export."""
    try:
        return json.loads((Path(folder) / MODEL_DIR / MARKER).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sample(
    folder: Path,
    prompt: str,
    max_new_tokens: int = 100,
    seed: int = 0,
    temperature: float | None = None,
    chat: bool = True,
    **generate: Any,
) -> str:
    """Text that the exported model of a run folder (or a model folder) writes after ``prompt``.

    ``temperature=0`` decodes greedily (``do_sample=False``), as Hugging Face users expect; an empty prompt starts
    from :func:`_start_ids` and prints only what the model writes. With ``chat`` and a tokenizer that has a chat
    template (an instruction-tuned run's export), the prompt is a user turn in that format and only the answer is
    returned, up to the template's end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .errors import UsageError
    from .modelfolder import check_weights, read_config

    path = Path(folder)
    path = path / MODEL_DIR if (path / MODEL_DIR).is_dir() else path
    config = read_config(path)
    if config is None:
        raise UsageError(
            f"{folder} holds no model: give the run folder of a finished `gradspace pretrain` (it "
            f"writes {Path(folder) / MODEL_DIR}) or a Hugging Face model folder"
        )
    _refuse_non_causal(folder, path, config)
    if max_new_tokens < 1 or (temperature is not None and not temperature >= 0):
        raise UsageError("--max-new-tokens must be >= 1 and --temperature >= 0 (0: greedy decoding)")
    if temperature == 0:
        generate.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    elif temperature is not None:
        generate["temperature"] = temperature
    check_weights(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    chat = chat and bool(getattr(tok, "chat_template", None)) and bool(prompt.strip())
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids if prompt else torch.zeros(1, 0, dtype=torch.long)
    start = ids.shape[1] if chat else 0
    if not ids.shape[1]:  # generate cannot start from nothing
        ids = torch.tensor([_start_ids(tok, model)])
        start = ids.shape[1]
    torch.manual_seed(seed)
    stop = ""
    if chat:
        from .chat import stopping, turn_stop

        stop = turn_stop(tok.chat_template)
        generate.update(stopping(stop, tok))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **generate)
    text = tok.decode(out[0, start:], skip_special_tokens=True)
    return text.split(stop)[0].strip() if chat and stop else text.strip() if chat else text


def _start_ids(tok, model) -> list[int]:
    """Where a sample with an empty prompt starts: the tokenizer's BOS (else EOS) token, as a document does, unless
    the model never trained on it (``suppress_tokens``: a compacted GPT-2 run); else a newline (``--tokenizer
    chars``, whose tokenizer has neither)."""
    suppressed = set(getattr(model.generation_config, "suppress_tokens", None) or [])
    for token in (tok.bos_token_id, tok.eos_token_id):
        if token is not None and token not in suppressed:
            return [token]
    return tok("\n", add_special_tokens=False).input_ids[:1] or [0]


def _refuse_non_causal(folder: Path, path: Path, config: dict[str, Any]) -> None:
    """A folder whose config names no causal-LM architecture (a fine-tuning run's classifier) is a UsageError
    saying what it holds and what loads it: ``AutoModelForCausalLM`` would load it with a fresh LM head and write
    random words."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .errors import UsageError

    archs = [str(a) for a in config.get("architectures") or []]
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not archs or any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UsageError(
            f"{folder} holds a {archs[0]}, not a causal language model: `gradspace sample` needs one "
            "(a `gradspace pretrain` run, or a folder AutoModelForCausalLM loads)"
        )
    kind = "regressor" if config.get("problem_type") == "regression" else "classifier"
    task = _run_task(path)
    raise UsageError(
        f"{folder} holds a sequence {kind} ({archs[0]}" + (f", fine-tuned on task {task}" if task else "") + "), "
        f"not a language model to sample from: load it with AutoModelForSequenceClassification.from_pretrained"
        f"('{path}') or pipeline('text-classification', model='{path}'); `gradspace sample` takes a "
        "`gradspace pretrain` run"
    )


def _run_task(path: Path) -> str | None:
    """The fine-tuning task of the run whose ``model`` folder ``path`` is (its config.json), if it says."""
    try:
        task = json.loads((path.parent / "config.json").read_text()).get("task") if path.name == MODEL_DIR else None
    except (OSError, ValueError, AttributeError):
        return None
    return str(task) if task else None
