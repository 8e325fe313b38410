"""``gradspace eval RUN --tasks ...``: lm-evaluation-harness (``lm-eval``) on a run's exported causal LM, offline.

    gradspace eval runs/sft --tasks my_task.yaml              # a local task file (its data files local too)
    gradspace eval runs/sft --tasks hellaswag --limit 200      # a harness task, with its data in the HF cache

The model is ``RUN/model`` (or any Hugging Face model folder) through the harness's ``hf`` model. A ``--tasks``
entry that is a YAML file is a task of the harness's format (``dataset_path: json`` with local ``data_files``
runs without a network); its folder is searched for tasks, as ``--include-path`` is. The results go to
``RUN/eval/lm-eval.json`` (replaced whole) when RUN is a run folder, and a line per task and metric is printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UsageError

FLAGS = [
    (["run"], {"help": "a run folder (its model/) or a Hugging Face model folder"}),
    (["--tasks"], {"required": True, "help": "comma-separated harness task names or task YAML files"}),
    (["--include-path"], {"help": "a folder of more task YAML files"}),
    (["--limit"], {"type": int, "help": "at most this many examples per task"}),
    (["--batch-size"], {"type": int, "default": 8}),
    (["--num-fewshot"], {"type": int}),
    (["--device"], {"default": "cpu"}),
    (
        ["--apply-chat-template"],
        {"action": "store_true", "help": "format each prompt with the tokenizer's chat template (SFT runs)"},
    ),
    (["--threads"], {"type": int, "default": 0}),
]


def _tasks(spec: str, include: str | None) -> tuple[list[str], list[str]]:
    """``(task names, folders to search)``: a YAML entry is read for its ``task`` name and adds its folder."""
    import yaml

    names, folders = [], [include] if include else []
    for entry in (t.strip() for t in spec.split(",") if t.strip()):
        path = Path(entry).expanduser()
        if path.suffix.lower() not in (".yaml", ".yml"):
            names.append(entry)
            continue
        if not path.is_file():
            raise UsageError(f"--tasks {entry}: no such task file")
        try:
            name = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("task")
        except yaml.YAMLError as err:
            raise UsageError(f"task file {path} does not parse: {str(err).splitlines()[0]}") from None
        if not isinstance(name, str):
            raise UsageError(f"task file {path} has no 'task' name")
        names.append(name)
        folders.append(str(path.parent.resolve()))
    if not names:
        raise UsageError("--tasks names no task")
    return names, folders


def evaluate(args: Any) -> dict[str, Any]:
    """The harness's ``results`` for the run's model; written to ``RUN/eval/lm-eval.json`` for a run folder."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("gradspace eval runs lm-evaluation-harness: pip install lm-eval") from None
    from .atomic import write_atomic
    from .export import MODEL_DIR
    from .modelfolder import read_config

    run = Path(args.run)
    folder = run / MODEL_DIR if (run / MODEL_DIR).is_dir() else run
    if read_config(folder) is None:
        raise UsageError(f"{args.run} holds no model: give a run folder with model/ or a Hugging Face model folder")
    names, folders = _tasks(args.tasks, args.include_path)
    manager = TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}: give a task YAML file or --include-path")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32"},
        tasks=names,
        task_manager=manager,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
    )
    results = out["results"]
    if (run / MODEL_DIR).is_dir():
        report = {
            "tasks": names,
            "limit": args.limit,
            "apply_chat_template": args.apply_chat_template,
            "results": results,
        }
        (run / "eval").mkdir(exist_ok=True)
        write_atomic(run / "eval" / "lm-eval.json", json.dumps(report, indent=1, default=str))
    return results


def lines(results: dict[str, Any]) -> list[str]:
    """``task metric value (+- stderr)`` for each number the harness reports."""
    out = []
    for task, figures in results.items():
        for key, value in figures.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, float) and not metric.endswith("_stderr"):
                err = figures.get(f"{metric}_stderr,{key.partition(',')[2]}")
                out.append(f"{task} {metric} {value:.4f}" + (f" +- {err:.4f}" if isinstance(err, float) else ""))
    return out
