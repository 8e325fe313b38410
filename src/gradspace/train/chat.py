"""Conversations and chat templates for supervised fine-tuning of a causal LM.

A training example is a conversation: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, read from
the row formats people have (:func:`conversation`): alpaca (``instruction``, ``input``, ``output``, optional
``system`` and ``history``), chat (``messages`` with ``role``/``content``; ShareGPT's ``conversations`` with
``from``/``value``) and ``prompt``/``completion``.

A template turns a conversation into text segments, each marked as prompt (not trained on) or response (the
loss is taken on it): :func:`segments`. ``auto`` uses the tokenizer's own chat template (``apply_chat_template``)
when it has one, else ``default``. The named templates are written as LLaMA-Factory writes them (its
``data/template.py``: ``default``, ``alpaca``, ``chatml``, ``llama3``, ``qwen``, ``empty``), so a model trained
here answers in the format a LLaMA-Factory user expects; :func:`jinja` gives each the chat template an exported
tokenizer carries, so ``gradspace sample`` and ``apply_chat_template`` format prompts as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Template:
    """``{content}`` marks a turn's text; ``{eos}`` the tokenizer's end-of-sequence token, ``{bos}`` its BOS."""

    user: str
    assistant: str
    system: str = "{content}"
    prefix: str = ""  #: before the first turn (a BOS token)
    default_system: str = ""
    stop: str = ""  #: where a generated answer ends when the tokenizer has no such token (empty: EOS)


#: LLaMA-Factory's templates of these names (``register_template`` in its ``data/template.py``)
TEMPLATES: dict[str, Template] = {
    "default": Template(
        user="Human: {content}{eos}\nAssistant:",
        assistant="{content}{eos}\n",
        system="System: {content}{eos}\n",
    ),
    "alpaca": Template(
        user="### Instruction:\n{content}\n\n### Response:\n",
        assistant="{content}{eos}\n\n",
        default_system="Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n",
    ),
    "chatml": Template(
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        stop="<|im_end|>",
    ),
    "llama3": Template(
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        prefix="{bos}",
        stop="<|eot_id|>",
    ),
    "empty": Template(user="{content}", assistant="{content}{eos}"),
}
#: Qwen's is ChatML with Qwen's system prompt
TEMPLATES["qwen"] = replace(
    TEMPLATES["chatml"], default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
)
TEMPLATE_CHOICES = ("auto", *TEMPLATES)
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ---------------------------------------------------------------------------------------------- row formats
def row_format(row: dict[str, Any]) -> str | None:
    """``"alpaca"``, ``"messages"``, ``"sharegpt"``, ``"prompt"``, or None for a row that is none of these."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and ("completion" in row or "response" in row):
        return "prompt"
    return None


def conversation(row: dict[str, Any], where: str) -> Conversation:
    """The conversation of one data row; ``where`` (``"file.jsonl row 3"``) names it in errors."""
    kind = row_format(row)
    if kind == "alpaca":
        turns: Conversation = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
        for old in row.get("history") or []:  # LLaMA-Factory's [[instruction, response], ...]
            if not (isinstance(old, (list, tuple)) and len(old) == 2):
                raise ValueError(f"{where}: 'history' must be a list of [instruction, response] pairs")
            turns += [{"role": "user", "content": str(old[0])}, {"role": "assistant", "content": str(old[1])}]
        query = str(row["instruction"]) + (f"\n{row['input']}" if row.get("input") else "")
        return _checked(
            [*turns, {"role": "user", "content": query}, {"role": "assistant", "content": row["output"]}], where
        )
    if kind == "prompt":
        answer = row.get("completion", row.get("response"))
        return _checked([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}], where)
    if kind == "messages":
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        return _checked([{"role": m.get("role"), "content": m.get("content")} for m in messages], where)
    if kind == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
            raise ValueError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} objects")
        roles = [_SHAREGPT_ROLES.get(str(m.get("from")).lower(), m.get("from")) for m in turns]
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return _checked([*system, *({"role": r, "content": m.get("value")} for r, m in zip(roles, turns))], where)
    raise ValueError(
        f"{where} is not an instruction example: give 'instruction' and 'output' (alpaca, optional 'input'), "
        f"'messages' (chat), 'conversations' (ShareGPT) or 'prompt' and 'completion'; its keys: {', '.join(row)}"
    )


def _checked(turns: list[dict[str, Any]], where: str) -> Conversation:
    """Roles known, text present, an optional system turn first, then user and assistant alternating, ending
    with the assistant (whose answer is what is trained)."""
    for i, t in enumerate(turns):
        if t["role"] not in ROLES:
            raise ValueError(f"{where}: turn {i + 1} has role {t['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(t["content"], str) or (t["role"] != "system" and not t["content"].strip()):
            raise ValueError(f"{where}: turn {i + 1} ({t['role']}) has no text")
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or [t["role"] for t in body] != expected or len(body) % 2:
        order = ", ".join(t["role"] for t in turns) or "nothing"
        raise ValueError(
            f"{where}: a conversation is an optional system turn, then user and assistant turns in turn, "
            f"ending with the assistant; this one has {order}"
        )
    return [{"role": t["role"], "content": t["content"]} for t in turns]


# ---------------------------------------------------------------------------------------------- rendering
def resolve(name: str, tokenizer: Any) -> str:
    """The template a run uses: ``auto`` is the tokenizer's own chat template when it has one, else ``default``."""
    if name == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "default"
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
    return name


def segments(turns: Conversation, template: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """``[(text, is_response), ...]`` whose concatenation is the formatted conversation; every assistant turn
    is a response (LLaMA-Factory trains on all of them unless its history is masked)."""
    if template == "tokenizer":
        return _tokenizer_segments(turns, tokenizer)
    t = TEMPLATES[template]
    tokens = {"eos": tokenizer.eos_token or "", "bos": tokenizer.bos_token or ""}
    out: list[tuple[str, bool]] = []
    system = turns[0]["content"] if turns[0]["role"] == "system" else t.default_system
    head = t.prefix.format(**tokens, content="") + (t.system.format(**tokens, content=system) if system else "")
    for turn in turns:
        if turn["role"] == "user":
            out.append((head + t.user.format(**tokens, content=turn["content"]), False))
            head = ""
        elif turn["role"] == "assistant":
            out.append((t.assistant.format(**tokens, content=turn["content"]), True))
    return out


def prompt_text(turns: Conversation, template: str, tokenizer: Any) -> str:
    """What the model is given to answer the last user turn of ``turns`` (an assistant turn there is dropped)."""
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if template == "tokenizer":
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(
        text for text, _ in segments([*turns, {"role": "assistant", "content": ""}], template, tokenizer)[:-1]
    )


def stop_text(template: str, tokenizer: Any = None) -> str:
    """Where an answer ends: a named template's end of turn, or what the tokenizer's own template writes after an
    assistant's text (Qwen's ``<|im_end|>``, Gemma's ``<end_of_turn>``; empty where that is only its EOS)."""
    if template in TEMPLATES:
        return TEMPLATES[template].stop
    if tokenizer is None:
        return ""
    mark = "Q7x9Z"  # an answer no template rewrites
    answer = segments([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}], template, tokenizer)
    tail = answer[-1][0].partition(mark)[2].strip()
    return "" if tail in ("", tokenizer.eos_token) else tail


def turn_stop(chat_template: str) -> str:
    """The stop text of the named template whose Jinja ``chat_template`` is (empty for a tokenizer's own
    template, which ends turns with its EOS token, where generation stops anyway)."""
    return next((t.stop for name, t in TEMPLATES.items() if t.stop and chat_template == jinja(name)), "")


def stopping(stop: str, tokenizer: Any) -> dict[str, Any]:
    """``generate`` keywords that end an answer at ``stop`` (a string of several tokens where the tokenizer
    lacks the template's special token, e.g. GPT-2's with ``chatml``)."""
    return {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}


def _tokenizer_segments(turns: Conversation, tokenizer: Any) -> list[tuple[str, bool]]:
    """The tokenizer's template rendered turn by turn: each assistant answer is what the full rendering adds
    after the prompt for it (``add_generation_prompt``). A template that is not prefix-stable (one that rewrites
    earlier turns, e.g. drops past reasoning) cannot be split this way and is refused."""
    render = lambda ts, gen: tokenizer.apply_chat_template(ts, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    out: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt, full = render(turns[:i], True), render(turns[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation turn by turn (an earlier turn "
                "changes when a later one is added): choose a named --template"
            )
        out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return out


def jinja(template: str) -> str:
    """A Hugging Face chat template (Jinja) that renders a conversation as :func:`segments` does, with
    ``add_generation_prompt`` ending on the assistant's header."""
    t = TEMPLATES[template]
    user_head, _, user_tail = t.user.partition("{content}")
    system = (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system = " + repr(t.default_system) + " %}{% endif %}"
    )
    return (
        system
        + "{{ "
        + _jinja_text(t.prefix)
        + " }}"
        + "{% if system %}{{ "
        + _jinja_text(t.system, "system")
        + " }}{% endif %}"
        + "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        + "{{ "
        + _jinja_text(user_head + "{content}")
        + " }}"
        + "{% if not loop.last or add_generation_prompt %}{{ "
        + _jinja_text(user_tail)
        + " }}{% endif %}"
        + "{% else %}{{ "
        + _jinja_text(t.assistant)
        + " }}{% endif %}{% endfor %}"
    )


def _jinja_text(text: str, content: str = "message['content']") -> str:
    """A template string as a Jinja expression: literal parts quoted, ``{content}``/``{eos}``/``{bos}`` as
    variables, joined by ``~`` (which renders an undefined token as nothing)."""
    names = {"{content}": content, "{eos}": "eos_token", "{bos}": "bos_token"}
    parts, rest = [], text
    while rest:
        found = [(rest.find(k), k) for k in names if k in rest]
        if not found:
            parts.append(repr(rest))
            break
        at, key = min(found)
        if at:
            parts.append(repr(rest[:at]))
        parts.append(names[key])
        rest = rest[at + len(key) :]
    return " ~ ".join(parts) or "''"
