"""A full-parameter fine-tune exported as a LoRA adapter, at a few ranks: adapter size and task metric against the
fine-tune's own (AdaRankGrad's recipe; ``gradspace export RUN --lora-rank R|auto``).

    python tools/lora_export_study.py RUN [RUN ...] [--ranks 4,8,32,auto] [--out docs/results/lora-export.md]

Each RUN is a finished ``gradspace finetune`` folder. It is copied to a scratch folder (the export rewrites
``RUN/adapter``), exported once per rank by the command line as a user would, and each adapter is loaded onto the
starting model with ``PeftModel.from_pretrained`` and evaluated on the run's validation split by the code that
evaluates a run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def evaluate(model, cfg: dict, tokenizer) -> dict[str, float]:
    from gradspace.train.encoder import evaluate_task
    from gradspace.train.options import EVAL_BATCH
    from gradspace.train.tasks import collate_fn, eval_batches, load_task

    task = load_task(cfg["task"], cfg.get("eval_dataset"))
    collate = collate_fn(tokenizer, cfg["max_length"], torch.float32 if task.regression else torch.long)
    batches = eval_batches(task.validation, collate, EVAL_BATCH, cfg["eval_batches"] * EVAL_BATCH)
    return evaluate_task(model.eval(), batches, task.num_labels, task.regression)


def study(run: Path, ranks: list[str]) -> list[dict]:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gradspace.train.encoder import model_source

    cfg = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    metric = summary["metric"]
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    trained = AutoModelForSequenceClassification.from_pretrained(run / "model")
    model_bytes = sum(p.numel() * p.element_size() for p in trained.parameters())
    rows = [
        {
            "run": run.name,
            "form": "full fine-tune",
            "bytes": model_bytes,
            **_metrics(evaluate(trained, cfg, tokenizer), metric),
        }
    ]
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("adapter"))
        for rank in ranks:
            cmd = [sys.executable, "-m", "gradspace", "export", str(copy), "--lora-rank", rank, "--overwrite"]
            said = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            report = json.loads((copy / "adapter" / "gradspace.json").read_text())
            num_labels = trained.config.num_labels
            base = AutoModelForSequenceClassification.from_pretrained(
                model_source(cfg["model"])[0], num_labels=num_labels
            )
            adapted = PeftModel.from_pretrained(base, copy / "adapter")
            got = _metrics(evaluate(adapted, cfg, tokenizer), metric)
            kept = [w["energy_kept"] for w in report["weights"].values()]
            rank_list = sorted(w["rank"] for w in report["weights"].values())
            rows.append(
                {
                    "run": run.name,
                    "form": f"LoRA rank {rank}" + (f" ({rank_list[0]}-{rank_list[-1]})" if rank == "auto" else ""),
                    "bytes": report["adapter_bytes"],
                    "energy": f"{min(kept):.1%}-{max(kept):.1%}",
                    "full_modules": ", ".join(report["full_modules"]),
                    **got,
                }
            )
            print(f"{run.name} rank {rank}: {got}; {said}", file=sys.stderr)
    return rows


def _metrics(metrics: dict[str, float], metric: str) -> dict:
    return {"metric": metric, "value": metrics[metric], "val_loss": metrics["val_loss"]}


def table(rows: list[dict]) -> str:
    lines = [
        "| run | form | size MiB | metric | value | val loss | energy kept per weight | modules in full |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['form']} | {r['bytes'] / 2**20:.1f} | {r['metric']} | {r['value']:.4f} | "
            f"{r['val_loss']:.4f} | {r.get('energy', '-')} | {r.get('full_modules', '-') or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--ranks", default="4,8,32,auto")
    parser.add_argument("--out", type=Path, default=None, help="write the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [row for run in args.runs for row in study(run, args.ranks.split(","))]
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
