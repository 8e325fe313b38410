"""``gradspace compare``: every method on the same data, seed and budget, each in its own process, then a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..methods import METHODS
from .config import FINETUNE, PRETRAIN, UsageError
from .encoder import FinetuneSetup
from .interrupt import ChildHandlesInterrupt
from .streams import Data


def parse_methods(value) -> list[str]:
    """``"adamw,galore"`` or a list of names (a config file's ``methods``), checked against the presets."""
    if isinstance(value, str):
        methods = [m.strip().lower() for m in value.split(",") if m.strip()]
    else:
        methods = [str(m).lower() for m in value]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return methods


def _run_child(
    command: str, cfg: dict[str, Any], out: Path, stop_after: int | None, overwrite: bool = False
) -> dict[str, Any]:
    """``python -m gradspace <command>`` in a fresh process, so its peak memory is its own; returns its summary."""
    src = str(Path(__file__).resolve().parent.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"  # JSON is YAML: read back by --config
        config.write_text(json.dumps(cfg))
        argv = [sys.executable, "-m", "gradspace", command, "--config", str(config), "--out", str(out)]
        if stop_after is not None:
            argv += ["--stop-after", str(stop_after)]
        if overwrite:
            argv.append("--overwrite")
        with ChildHandlesInterrupt():
            code = subprocess.run(argv, env=env, check=False).returncode
    if code in (130, 143):
        print(f"gradspace: compare stopped during {cfg['method']}; no report written", file=sys.stderr)
        raise SystemExit(code)
    if code == 3:  # diverged: the run is saved and its summary says so; the comparison goes on and reports it
        print(f"gradspace: {cfg['method']} diverged; the report marks it", file=sys.stderr)
    elif code != 0:
        raise SystemExit(code)  # the child has printed its one-line error
    return json.loads((out / "summary.json").read_text())


def run_compare(
    cfg: dict[str, Any], methods: list[str], out: Path, stop_after: int | None = None, overwrite: bool = False
) -> dict:
    """Every method on the same data, seed and budget, each in its own process and subfolder; then the report."""
    from .report import text_table, write_report

    finetune = "task" in cfg
    runs = {
        m: {**cfg, "method": m, **({"rank": None, "update_gap": None} if METHODS[m] is None else {})} for m in methods
    }
    for run_cfg in runs.values():
        (FINETUNE if finetune else PRETRAIN).validate(run_cfg)
    if finetune:  # prepares the task and model caches once, and checks rank and length before any run starts
        setup = FinetuneSetup(runs[methods[-1]])
        what = f"fine-tuning {cfg['model']} on {setup.info}"
    else:
        what = f"llama-{cfg['preset']}, {Data(runs[methods[0]]).info}"
    print(f"gradspace compare: {', '.join(methods)}; {what}; report in {out}", file=sys.stderr)
    command = "finetune" if finetune else "pretrain"
    results = {m: _run_child(command, runs[m], out / m, stop_after, overwrite) for m in methods}
    write_report(out, results, {**cfg, "methods": methods})
    print(f"\n{text_table(results)}\n\nreport: {out / 'report.md'}")
    return results
