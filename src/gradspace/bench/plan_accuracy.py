"""How close ``gradspace plan`` comes to the measured peak: each configuration's real training steps in a fresh
process (``bench.real_memory``: peak RSS on CPU, ``max_memory_allocated`` on CUDA) beside the planner's prediction
for the same setup, and the error.

``python -m gradspace.bench plan-accuracy --presets tiny,60m,350m``: LLaMA (vocabulary 32,000, float32), batch 1
and 4 x 256 tokens, gradient checkpointing on and off, 2 steps, rank hidden/4 (APOLLO-Mini its own 1), randomized
SVD, for AdamW, 8-bit AdamW, GaLore, GaLore 8-bit layer-wise and APOLLO-Mini layer-wise (gradspace's own, as
``gradspace pretrain`` runs them), and the last two with bfloat16 and int8 weights (``--dtype``). A configuration
predicted not to fit the free memory is not launched.
"""

from __future__ import annotations

from ..methods import preset_projection
from ..train.models import PRESETS, build_llama
from ..train.report import markdown_table
from .real_memory import free_bytes, measure

GiB = 2**30
#: (label, method, options, layer-wise)
CONFIGS = [
    ("AdamW", "adamw", {}, False),
    ("8-bit AdamW", "adamw", {"base": "adamw8bit"}, False),
    ("GaLore", "galore", {}, False),
    ("GaLore 8-bit layer-wise", "galore", {"base": "adamw8bit"}, True),
    ("APOLLO-Mini layer-wise", "apollo-mini", {}, True),
    ("GaLore 8-bit layer-wise bf16 weights", "galore", {"base": "adamw8bit", "dtype": "bfloat16"}, True),
    ("GaLore 8-bit layer-wise int8 weights", "galore", {"base": "adamw8bit", "dtype": "int8"}, True),
    ("APOLLO-Mini layer-wise int8 weights", "apollo-mini", {"dtype": "int8"}, True),
]


def predict(preset: str, method: str, options: dict, layerwise: bool, batch: int, ckpt: bool, seq_len: int, vocab: int):
    from ..plan.memory import plan_memory

    model = build_llama(preset, vocab_size=vocab, device="meta")
    rank = preset_projection(method).get("rank", PRESETS[preset][0] // 4)
    return plan_memory(
        model,
        method=method,
        base=options.get("base", "adamw"),
        dtype=options.get("dtype", "float32"),
        rank=rank,
        layerwise=layerwise,
        grad_checkpointing=ckpt,
        batch_size=batch,
        seq_len=seq_len,
        svd="randomized",
    )


def run(
    presets=("tiny", "60m", "350m"),
    batches=(1, 4),
    seq_len: int = 256,
    steps: int = 2,
    threads: int = 2,
    vocab: int = 32000,
    labels=None,
) -> str:
    rows, errors = [], []
    for preset in presets:
        for label, method, options, layerwise in CONFIGS:
            if labels and label not in labels:
                continue
            for ckpt in (True, False):
                for batch in batches:
                    plan = predict(preset, method, options, layerwise, batch, ckpt, seq_len, vocab)
                    where = [preset, label, "on" if ckpt else "off", batch, plan.peak / GiB]
                    if plan.peak > 0.9 * free_bytes():
                        rows.append([*where, "not run (predicted not to fit)", "-"])
                        continue
                    spec = {
                        "preset": preset,
                        "method": method,
                        "options": options,
                        "layerwise": layerwise,
                        "rank": PRESETS[preset][0] // 4,
                        "steps": steps,
                        "seq_len": seq_len,
                        "threads": threads,
                        "device": "cpu",
                        "vocab": vocab,
                        "checkpointing": ckpt,
                        "batch": batch,
                    }
                    peak = measure(label, spec)["peak"]
                    error = plan.peak / peak - 1
                    errors.append(abs(error))
                    rows.append([*where, peak / GiB, f"{error:+.1%}"])
    worst = f"; largest error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}" if errors else ""
    return (
        f"Predicted (gradspace plan) and measured peak, GiB: LLaMA presets, vocabulary {vocab}, float32, x {seq_len} "
        f"tokens, {steps} steps, {threads} threads, peak RSS{worst}\n\n"
        + markdown_table(["preset", "configuration", "checkpointing", "batch", "predicted", "measured", "error"], rows)
    )


def register(subparsers) -> None:
    """``bench plan-accuracy``."""
    p = subparsers.add_parser("plan-accuracy", help="the memory planner's prediction beside measured peaks")
    p.add_argument("--presets", default="tiny,60m,350m")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--real-threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated configuration labels")
    p.set_defaults(main=cli)


def cli(args) -> str:
    return run(
        tuple(args.presets.split(",")),
        tuple(int(b) for b in args.batches.split(",")),
        args.seq_len,
        args.steps,
        args.real_threads,
        labels=args.only.split(",") if args.only else None,
    )
