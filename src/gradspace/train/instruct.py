"""``synth-instruct``: the built-in instruction set, made by this module, so supervised fine-tuning runs offline.

No instruction set ships on PyPI in a form that installs without a network to the Hugging Face hub, so the
default is generated: short tasks with one correct answer each (arithmetic, sorting, reversing and spelling
words, counting, number words, comparisons), in the alpaca format (``instruction``, ``input``, ``output``), from
a fixed seed and the word list below. It is not a benchmark of general instruction following; it is a task on
which a small model's learning shows within minutes on a CPU, and whose held-out answers can be checked exactly
(``exact_match``). The rows are made by code in this file (no third-party text, nothing to license); for real
work pass a file (``--task data.jsonl``) in alpaca, chat or prompt/completion form.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAME = "synth-instruct"
SIZE = 3000  #: rows; the last VALIDATION of a seeded shuffle validate
VALIDATION = 200
SEED = 20261204

WORDS = (  # noqa: SIM905 - a word list reads best as text
    "apple river stone cloud garden window silver orange planet forest candle market bridge winter summer "
    "letter mirror pocket rabbit thunder yellow violet castle doctor engine family guitar harbor island jacket "
    "kitten ladder meadow number object pepper quiet rocket saddle tunnel velvet wander basket cotton dinner "
    "falcon ginger hollow insect jungle kettle lemon magnet needle oyster puzzle riddle shadow timber urchin "
    "valley walnut zipper anchor button copper dragon feather goblin hammer marble noodle parrot quartz salmon "
    "tomato turtle wizard"
).split()
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _int(r: random.Random, lo: int, hi: int) -> int:
    """An integer in [lo, hi] from ``random()`` alone: the one method whose sequence Python keeps across
    versions (``randint``, ``choice`` and ``sample`` may change)."""
    return lo + int(r.random() * (hi - lo + 1))


def _pick(r: random.Random, items):
    return items[_int(r, 0, len(items) - 1)]


def _sample(r: random.Random, items, k: int) -> list:
    pool = list(items)
    return [pool.pop(_int(r, 0, len(pool) - 1)) for _ in range(k)]


def _add(r: random.Random) -> dict[str, str]:
    a, b = _int(r, 0, 99), _int(r, 0, 99)
    return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}


def _subtract(r: random.Random) -> dict[str, str]:
    a, b = sorted((_int(r, 0, 99), _int(r, 0, 99)), reverse=True)
    return {"instruction": "Subtract the second number from the first.", "input": f"{a} {b}", "output": str(a - b)}


def _sort(r: random.Random) -> dict[str, str]:
    xs = [_int(r, 0, 50) for _ in range(_int(r, 3, 6))]
    return {
        "instruction": "Sort these numbers from smallest to largest.",
        "input": ", ".join(map(str, xs)),
        "output": ", ".join(map(str, sorted(xs))),
    }


def _reverse(r: random.Random) -> dict[str, str]:
    w = _pick(r, WORDS)
    return {"instruction": f"Spell the word '{w}' backwards.", "input": "", "output": w[::-1]}


def _upper(r: random.Random) -> dict[str, str]:
    words = _sample(r, WORDS, _int(r, 1, 3))
    return {
        "instruction": "Write this in capital letters.",
        "input": " ".join(words),
        "output": " ".join(words).upper(),
    }


def _count(r: random.Random) -> dict[str, str]:
    w = _pick(r, WORDS)
    return {"instruction": f"How many letters are in the word '{w}'?", "input": "", "output": str(len(w))}


def _digits(r: random.Random) -> dict[str, str]:
    ds = [_int(r, 0, 9) for _ in range(_int(r, 2, 5))]
    return {
        "instruction": "Write each digit as a word.",
        "input": " ".join(map(str, ds)),
        "output": " ".join(DIGITS[d] for d in ds),
    }


def _larger(r: random.Random) -> dict[str, str]:
    a, b = _sample(r, range(100), 2)
    return {"instruction": f"Which is larger, {a} or {b}?", "input": "", "output": str(max(a, b))}


def _first(r: random.Random) -> dict[str, str]:
    words = _sample(r, WORDS, _int(r, 3, 5))
    return {
        "instruction": "Which of these words comes first in alphabetical order?",
        "input": ", ".join(words),
        "output": min(words),
    }


KINDS: tuple[Callable[[random.Random], dict[str, str]], ...] = (
    _add,
    _subtract,
    _sort,
    _reverse,
    _upper,
    _count,
    _digits,
    _larger,
    _first,
)


def rows(size: int = SIZE, seed: int = SEED) -> list[dict[str, str]]:
    """``size`` distinct alpaca rows (no two with the same instruction and input, so the held-out rows are not
    also training rows), the same on every machine and Python version (see :func:`_int`). The kinds take turns;
    a kind whose few prompts are all used (spelling and counting 78 words) gives way to the others."""
    r = random.Random(seed)
    out, seen, i = [], set(), 0
    while len(out) < size:
        row = KINDS[i % len(KINDS)](r)
        i += 1
        if (row["instruction"], row["input"]) not in seen:
            seen.add((row["instruction"], row["input"]))
            out.append(row)
    return out
