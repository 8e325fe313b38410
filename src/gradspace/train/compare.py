"""``gradspace compare``: every method on the same data, budget and tuning, each run in its own process, then a
report.

A comparison is a plan of runs: per method, optionally a short tuning run per learning rate of a grid (the best by
validation loss is kept), then one full run per seed. Each run has its own folder, so a rerun with the same
``--out`` keeps the runs that finished, resumes an interrupted one from its checkpoint and starts the rest; its
report covers every method the folder has finished runs of, those of earlier reruns too.

    out/compare.json                  what the comparison is (a rerun must ask for the same)
    out/tune/<method>/lr-<lr>/        tuning runs (--lr-grid)
    out/<method>/ or out/<method>/seed-<s>/   the full runs (one seed, or several)
    out/report.md, metrics.json, *.png

A method may be a preset with options, ``adarank:eta_th=0.02`` or ``galore:rank=8``: a training option (rank, base,
scale, update_gap, lr, ...) is set as such, any other key goes to the tracker and rule (``optim_args``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import optim_args
from ..baselines import is_known, is_projected, method_names, takes_rank
from .atomic import write_atomic
from .config import FINETUNE, PRETRAIN, SEED_RANGE, parse_optim_args
from .errors import UsageError
from .interrupt import Relay
from .options import PER_METHOD, RUNTIME
from .streams import Data

MANIFEST = "compare.json"


def method_options(label: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``"adarank:eta_th=0.02"`` -> ``("adarank", {}, {"eta_th": 0.02})``: (preset, training options, optim_args)."""
    name, _, rest = label.partition(":")
    name = name.strip().lower()
    if not is_known(name):
        raise UsageError(f"unknown method {name!r} in {label!r}; choose from {', '.join(method_names())}")
    try:
        given = optim_args.parse(rest, f"method {label!r}", sep=";")
    except ValueError as err:
        raise UsageError(f"{err} (e.g. adarank:eta_th=0.02;r_min=4)") from None
    run, optim = {}, {}
    for key, value in given.items():
        key = key.replace("-", "_")
        (run if key in PER_METHOD else optim)[key] = value
    if name == "adamw" and (optim or {"rank", "update_gap", "scale"} & set(run)):
        raise UsageError(f"method {label!r}: adamw is full rank and takes no projection options")
    if not takes_rank(name) and {"rank", "update_gap", "scale"} & set(run):
        raise UsageError(f"method {label!r}: {name} has no rank, update gap or scale")
    return name, run, optim


def parse_methods(value) -> list[str]:
    """``"adamw,galore,adarank:eta_th=0.02"`` or a list of them (a config file's ``methods``), each checked."""
    if isinstance(value, str):
        labels = [m.strip() for m in value.split(",") if m.strip()]
    else:
        labels = [str(m).strip() for m in value]
    if not labels:
        raise UsageError(f"no methods given; choose from {', '.join(method_names())}")
    labels = [m if ":" in m else m.lower() for m in labels]
    for label in labels:
        method_options(label)
    repeated = sorted({m for m in labels if labels.count(m) > 1})
    if repeated:
        raise UsageError(f"method(s) given twice: {', '.join(repeated)}")
    return labels


def parse_lr_grid(value, labels: list[str]) -> dict[str, list[float]]:
    """Each method's learning rates to tune over: ``"1e-3,3e-3"`` for every method, ``"galore=1e-3,3e-3"`` for one
    (several such values may be given), or a config file's list or mapping (``default:`` for the others)."""
    if value is None:
        return {}
    items = value if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) else [value]
    grid: dict[str, list[float]] = {}
    for item in items:
        if isinstance(item, dict):
            pairs = [(str(k), v) for k, v in item.items()]
        elif isinstance(item, (list, tuple)):
            pairs = [("default", item)]
        else:
            text = str(item)
            key, sep, rates = text.rpartition("=")
            pairs = [(key.strip(), rates) if sep else ("default", text)]
        for key, rates in pairs:
            grid[key] = _rates(rates, key)
    unknown = sorted(set(grid) - {"default", *labels})
    if unknown:
        raise UsageError(f"--lr-grid names {', '.join(unknown)}, which are not among the methods compared")
    default = grid.pop("default", None)
    return {m: grid.get(m, default) for m in labels if grid.get(m, default)}


def rates_from(path, labels: list[str], grid: dict[str, list[float]]) -> dict[str, list[float]]:
    """``--lr-from``: the rate each method (not already in ``grid`` and not given ``lr=``) ran at in an earlier
    comparison (its tuned rate), read from that comparison's ``metrics.json``, as a one-rate grid."""
    if path is None:
        return {}
    file = Path(path) / "metrics.json" if Path(path).is_dir() else Path(path)
    try:
        results = json.loads(file.read_text())["results"]
        rates = {label: float(r["lr"]) for label, r in results.items() if isinstance(r, dict) and r.get("lr")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"--lr-from {path}: not a gradspace compare's folder or metrics.json ({err})") from None
    wanted = [m for m in labels if m not in grid and "lr" not in method_options(m)[1]]
    missing = [m for m in wanted if m not in rates]
    if missing:
        raise UsageError(
            f"--lr-from {path} has no learning rate for {', '.join(missing)} (it has {', '.join(rates) or 'none'}): "
            f"give theirs, e.g. --lr-grid {missing[0]}=1e-3"
        )
    return {m: [rates[m]] for m in wanted}


def _shown(methods: list[str], seeds: int, grid: dict[str, list[float]]) -> str:
    """The methods, seeds and learning rates of a comparison, in one line."""
    tuned = {m: grid[m] for m in methods if len(grid.get(m, ())) > 1}
    fixed = {m: grid[m][0] for m in methods if len(grid.get(m, ())) == 1}
    grids = {tuple(g) for g in tuned.values()}
    parts = [f"{', '.join(methods)} x {seeds} seed(s)"]
    if len(grids) == 1:
        which = "" if len(tuned) == len(methods) else f" ({', '.join(tuned)})"
        parts.append("lr tuned over " + ", ".join(f"{lr:g}" for lr in next(iter(grids))) + which)
    elif tuned:
        parts.append(f"lr tuned over {tuned}")
    if fixed:
        parts.append("lr " + ", ".join(f"{m} {lr:g}" for m, lr in fixed.items()))
    return ", ".join(parts)


def _rates(value, key: str) -> list[float]:
    raw = value.split(",") if isinstance(value, str) else list(value)
    try:
        rates = [float(x) for x in raw if str(x).strip()]
    except ValueError:
        raise UsageError(f"--lr-grid {key}: {value!r} is not a comma-separated list of learning rates") from None
    if not rates or any(not 0 < r < math.inf for r in rates):
        raise UsageError(f"--lr-grid {key}: learning rates must be finite positive numbers, got {value!r}")
    return sorted(set(rates))


def slug(label: str) -> str:
    return re.sub(r"[^\w.+=-]", "_", label)


@dataclass
class Run:
    """One child process of the comparison."""

    label: str
    seed: int
    cfg: dict[str, Any]
    folder: Path
    tuning: bool = False
    summary: dict[str, Any] | None = field(default=None, repr=False)


def run_config(base: dict[str, Any], label: str, seed: int, lr: float | None = None) -> dict[str, Any]:
    method, run, optim = method_options(label)
    cfg = {**base, "method": method, "seed": seed, **run}
    if optim:
        cfg["optim_args"] = {**parse_optim_args(base.get("optim_args")), **optim}
    if not takes_rank(method):
        cfg.update(rank=None, update_gap=None)
    elif not is_projected(method):
        cfg.update(update_gap=None)
    if lr is not None:
        cfg["lr"] = lr
    return cfg


def tuning_config(cfg: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The same run on ``fraction`` of the budget (its schedule and warm-up scaled to it), validated at the end."""
    steps = max(1, round(cfg["steps"] * fraction))
    warmup = cfg.get("warmup")
    return {
        **cfg,
        "steps": steps,
        "eval_every": 0,
        "save_every": 0,
        "warmup": None if warmup is None else min(steps - 1, round(warmup * fraction)),
    }


def _differing(saved: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The keys whose values differ (runtime-only keys aside), compared as JSON stores them."""
    norm = json.loads(json.dumps(cfg, default=str))
    return sorted(k for k, v in norm.items() if k not in RUNTIME and saved.get(k) != v)


def _status(run: Run) -> str:
    """done (a summary of this very configuration), resume (a checkpoint of it), fresh, or other: the folder holds
    a run of other settings (one the user resumed or extended by hand), which only --overwrite replaces."""
    from .checkpoint import list_checkpoints

    config = run.folder / "config.json"
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):
        return "fresh"
    if _differing(saved, run.cfg):
        return "other" if list_checkpoints(run.folder / "checkpoints") else "fresh"
    if (run.folder / "summary.json").exists():
        return "done"
    return "resume" if list_checkpoints(run.folder / "checkpoints") else "fresh"


class Launcher:
    """Runs children, ``jobs`` at a time, each in its own session: a signal to the parent (a terminal's Ctrl-C, or
    ``kill -INT``/``-TERM`` of its pid) is relayed to every running child once (they save and exit 130 or 143) and
    the parent waits. Once a child stops or fails, no new one starts."""

    def __init__(self, command: str, jobs: int, stop_after: int | None, overwrite: bool):
        self.command, self.jobs, self.stop_after, self.overwrite = command, jobs, stop_after, overwrite
        self.stopped: int | None = None
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.done = 0
        self.own_sessions = False

    def run(self, runs: list[Run]) -> None:
        """Every run of ``runs`` has its summary afterwards, or the comparison exits with the child's code."""
        todo = []
        statuses = {id(run): "fresh" if self.overwrite else _status(run) for run in runs}
        other = [run.folder for run in runs if statuses[id(run)] == "other"]
        if other:
            saved = json.loads((other[0] / "config.json").read_text())
            keys = ", ".join(_differing(saved, next(r.cfg for r in runs if r.folder == other[0])))
            raise UsageError(
                f"{other[0]} holds a run with other settings ({keys}) than this comparison gives it, resumed or "
                f"changed by hand: move it away to keep it, or pass --overwrite to rerun it"
                + (f" ({len(other) - 1} more such run(s))" if len(other) > 1 else "")
            )
        for run in runs:
            status = statuses[id(run)]
            if status == "done":
                run.summary = json.loads((run.folder / "summary.json").read_text())
            else:
                todo.append((run, status))
        if not todo:
            return
        self.total, self.done = len(todo), 0
        # the children start from worker threads even for one job: the main thread, where the relay runs, then
        # never holds the lock it takes
        relay = Relay(self._relay)
        self.own_sessions = relay.installed
        with relay, ThreadPoolExecutor(self.jobs) as pool:
            codes = list(pool.map(lambda job: self._launch(*job), todo))
        signalled = self.stopped if self.stopped in (130, 143) else None
        stop = next((c for c in codes if c in (130, 143)), signalled)
        if stop is not None:
            print(
                "gradspace: compare stopped; run the same command again to continue (finished runs are kept, an "
                "interrupted one resumes from its checkpoint)",
                file=sys.stderr,
            )
            raise SystemExit(stop)
        failed = next((c for c in codes if c not in (None, 0, 3)), None)
        if failed is not None:
            raise SystemExit(failed)  # the child has printed its one-line error

    def _relay(self, signum: int) -> None:
        """SIGINT goes on as SIGINT (save, exit 130; a second one aborts), SIGTERM and SIGHUP as SIGTERM (save,
        exit 143), to every running child; no new one starts."""
        import signal

        sent = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        with self.lock:
            if self.stopped is None:
                self.stopped = 130 if sent == signal.SIGINT else 143
            for child in self.live:
                child.send_signal(sent)

    def _launch(self, run: Run, status: str) -> int | None:
        cfg = dict(run.cfg)
        if self.jobs > 1 and not cfg.get("threads"):
            cfg["threads"] = max(1, (os.cpu_count() or 1) // self.jobs)
        src = str(Path(__file__).resolve().parent.parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        if self.jobs > 1:
            env["GRADSPACE_PROGRESS"] = "0"  # one progress bar per child would garble the terminal
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.json"  # read back by --config
            config.write_text(json.dumps(cfg))
            argv = [sys.executable, "-m", "gradspace", self.command, "--config", str(config), "--out", str(run.folder)]
            if status == "resume":
                argv += ["--resume", str(run.folder)]
            elif (run.folder / "config.json").exists() or self.overwrite:
                argv.append("--overwrite")  # a stale or half-made run of this comparison's own folder
            if self.stop_after is not None:
                argv += ["--stop-after", str(self.stop_after)]
            with self.lock:
                if self.stopped is not None:
                    return None
                child = subprocess.Popen(argv, env=env, start_new_session=self.own_sessions)  # signals: the relay
                self.live.add(child)
            code = child.wait()
            with self.lock:
                self.live.discard(child)
                if code not in (0, 3) and self.stopped is None:  # a relayed signal's stop stays one
                    self.stopped = code
                self.done += 1
        if code in (0, 3) and (run.folder / "summary.json").exists():
            run.summary = json.loads((run.folder / "summary.json").read_text())
            what = "tuning" if run.tuning else f"seed {run.seed}"
            diverged = " (diverged)" if run.summary.get("diverged") else ""
            loss = run.summary.get("val_loss", float("nan"))
            print(
                f"gradspace compare [{self.done}/{self.total}]: {run.label} {what} lr {run.summary.get('lr', '?'):g}"
                f": val loss {loss:.4f}{diverged}",
                file=sys.stderr,
            )
        elif code == 3:
            print(f"gradspace: {run.label} diverged; the report marks it", file=sys.stderr)
        return code


def check_manifest(out: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """A rerun into ``out`` continues its comparison only if it asks for the same one (it may add methods and
    seeds); returns the manifest to write, with the earlier methods' grids kept."""
    from .runfolder import holds_compare

    path = out / MANIFEST
    if overwrite or not out.exists():
        return manifest
    if not path.exists():
        if holds_compare(out):
            raise UsageError(
                f"{out} already holds runs or a report but no {MANIFEST}, so what it was is unknown and it cannot be "
                "resumed: choose another --out, or pass --overwrite to replace it"
            )
        return manifest
    saved = json.loads(path.read_text())
    grid, saved_grid = manifest["lr_grid"], saved.get("lr_grid") or {}
    # a grid may grow (its finished tuning runs are kept; a full run whose chosen rate changes reruns)
    differ = [f"lr_grid of {m}" for m in grid if m in saved_grid and not set(saved_grid[m]) <= set(grid[m])]
    differ += ["tune_fraction"] if grid and saved.get("tune_fraction") != manifest["tune_fraction"] else []
    differ += _differing(saved.get("config", {}), manifest["config"])
    if differ:
        raise UsageError(
            f"{out} holds a comparison with other settings ({', '.join(differ)}); rerun it with the same ones to "
            "continue it, choose another --out, or pass --overwrite to replace it"
        )
    earlier = [m for m in _recorded_methods(out, saved) if m not in manifest.get("methods", [])]
    return {**manifest, "lr_grid": {**saved_grid, **grid}, "methods": [*earlier, *manifest.get("methods", [])]}


def _recorded_methods(out: Path, saved: dict[str, Any]) -> list[str]:
    """The methods a comparison's folder was run with (its manifest's); those that do not parse are left out."""
    known = []
    for label in saved.get("methods") or []:
        try:
            method_options(label)
        except UsageError:
            continue
        known.append(label)
    return known


def run_compare(
    cfg: dict[str, Any],
    methods: list[str],
    out: Path,
    stop_after: int | None = None,
    overwrite: bool = False,
    seeds: int = 1,
    lr_grid=None,
    lr_from=None,
    tune_fraction: float = 0.25,
    jobs: int = 1,
) -> dict:
    """Tune (if asked), then run every method for every seed; write the report. Returns the per-method results."""
    from .report import text_table, write_report
    from .runfolder import absolute_paths
    from .spread import aggregate

    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise UsageError(f"seeds must be a positive integer, got {seeds!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise UsageError(f"jobs must be a positive integer, got {jobs!r}")
    if not isinstance(tune_fraction, (int, float)) or isinstance(tune_fraction, bool) or not 0 < tune_fraction <= 1:
        raise UsageError(f"tune-fraction must be in (0, 1], got {tune_fraction!r}")
    grid = parse_lr_grid(lr_grid, methods)
    grid.update(rates_from(lr_from, methods, grid))
    cfg = absolute_paths(cfg)  # the runs' configs and the manifest name the same files from any directory
    finetune = "task" in cfg
    command = FINETUNE if finetune else PRETRAIN
    seed_list = [cfg["seed"] + i for i in range(seeds)]
    several = seeds > 1
    for label in methods:
        for lr in grid.get(label) or [None]:
            command.validate(run_config(cfg, label, seed_list[0], lr))
            command.validate(tuning_config(run_config(cfg, label, seed_list[0], lr), tune_fraction))
    if seed_list[-1] > SEED_RANGE[1]:
        raise UsageError(
            f"--seed {cfg['seed']} with --seeds {seeds} reaches seed {seed_list[-1]}, past the largest "
            f"({SEED_RANGE[1]}): give a smaller --seed"
        )
    manifest = {"config": cfg, "methods": methods, "lr_grid": grid, "tune_fraction": tune_fraction}
    manifest = check_manifest(out, manifest, overwrite)
    if finetune:  # prepares the task and model caches once, and checks rank and length before any run starts
        from .recipes import finetune_setup

        setup = finetune_setup(run_config(cfg, methods[-1], seed_list[0]))
        what = f"fine-tuning {cfg['model']} on {setup.info}"
    else:
        what = f"llama-{cfg['preset']}, {Data(run_config(cfg, methods[0], seed_list[0])).info}"
    print(f"gradspace compare: {_shown(methods, seeds, grid)}; {what}; report in {out}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, default=str))
    launcher = Launcher(command.name, jobs, stop_after, overwrite)

    tuning = _tuning_runs(cfg, grid, seed_list[0], tune_fraction, out)
    launcher.run([r for runs in tuning.values() for r in runs])
    chosen, report_tuning = _chosen(tuning, grid, seed_list[0])
    finals = _final_runs(cfg, methods, seed_list, chosen, out)
    launcher.run(finals)
    per_seed = {label: {r.seed: r.summary for r in finals if r.label == label} for label in methods}
    earlier = [m for m in manifest["methods"] if m not in methods]
    per_seed.update(_finished(cfg, earlier, manifest["lr_grid"], seed_list, tune_fraction, out, report_tuning))
    per_seed = {label: per_seed[label] for label in manifest["methods"] if label in per_seed}  # first-run order
    results = {label: (aggregate(runs) if several else runs[seed_list[0]]) for label, runs in per_seed.items()}
    for label, info in report_tuning.items():
        results[label]["tuning"] = info
    write_report(
        out,
        results,
        {
            **cfg,
            "methods": list(results),
            "seeds": seed_list,
            "lr_grid": {m: g for m, g in manifest["lr_grid"].items() if m in results},
            "tune_fraction": tune_fraction,
            "jobs": jobs,
        },
        runs=per_seed if several else None,
    )
    print(f"\n{text_table(results)}\n\nreport: {out / 'report.md'}")
    return results


def _tuning_runs(
    cfg: dict[str, Any], grid: dict[str, list[float]], seed: int, fraction: float, out: Path
) -> dict[str, list[Run]]:
    """A short run per learning rate of each method whose grid has more than one."""
    return {
        label: [
            Run(
                label,
                seed,
                tuning_config(run_config(cfg, label, seed, lr), fraction),
                out / "tune" / slug(label) / f"lr-{lr:g}",
                tuning=True,
            )
            for lr in rates
        ]
        for label, rates in grid.items()
        if len(rates) > 1
    }


def _chosen(
    tuning: dict[str, list[Run]], grid: dict[str, list[float]], seed: int
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Each method's learning rate (the best tuning run's, or its one rate), and the tuning results to report."""
    chosen = {label: rates[0] for label, rates in grid.items()}
    report_tuning = {}
    for label, runs in tuning.items():
        losses = {r.cfg["lr"]: _tuning_loss(r.summary) for r in runs}
        chosen[label] = min(losses, key=lambda lr: (losses[lr], lr))
        report_tuning[label] = {
            "grid": sorted(losses),
            "val_loss": {f"{lr:g}": v for lr, v in sorted(losses.items())},
            "chosen": chosen[label],
            "steps": runs[0].cfg["steps"],
            "seed": seed,
        }
        if all(v == float("inf") for v in losses.values()):
            print(f"gradspace: every tuning run of {label} diverged; using the smallest rate", file=sys.stderr)
    return chosen, report_tuning


def _final_runs(
    cfg: dict[str, Any], labels: list[str], seed_list: list[int], chosen: dict[str, float], out: Path
) -> list[Run]:
    several = len(seed_list) > 1
    return [
        Run(
            label,
            seed,
            run_config(cfg, label, seed, chosen.get(label)),
            out / slug(label) / f"seed-{seed}" if several else out / slug(label),
        )
        for label in labels
        for seed in seed_list
    ]


def _all_done(runs: list[Run]) -> bool:
    """Whether every run has finished (its summary loaded), without starting any."""
    for run in runs:
        if _status(run) != "done":
            return False
        run.summary = json.loads((run.folder / "summary.json").read_text())
    return True


def _finished(
    cfg: dict[str, Any],
    labels: list[str],
    grid: dict[str, list[float]],
    seed_list: list[int],
    fraction: float,
    out: Path,
    report_tuning: dict[str, dict[str, Any]],
) -> dict[str, dict[int, dict[str, Any]]]:
    """The runs of methods an earlier run of this comparison asked for and this one did not: a report covers every
    method whose runs (for these seeds, and its tuning runs) the folder holds finished; none is started."""
    grid = {m: g for m, g in grid.items() if m in labels}
    tuning = _tuning_runs(cfg, grid, seed_list[0], fraction, out)
    tuned = {label: runs for label, runs in tuning.items() if _all_done(runs)}
    chosen, info = _chosen(tuned, grid, seed_list[0])
    found, missing = {}, []
    for label in labels:
        finals = _final_runs(cfg, [label], seed_list, chosen, out)
        if (label in tuning and label not in tuned) or not _all_done(finals):
            missing.append(label)
            continue
        found[label] = {r.seed: r.summary for r in finals}
        if label in info:
            report_tuning[label] = info[label]
    if missing:
        print(
            f"gradspace: the report leaves out {', '.join(missing)}, run here before but not finished for these "
            "seeds: add them to --methods to finish them",
            file=sys.stderr,
        )
    return found


def _tuning_loss(summary: dict[str, Any] | None) -> float:
    """A tuning run's score: its final validation loss; a diverged or non-finite run never wins."""
    if not summary or summary.get("diverged"):
        return float("inf")
    value = summary.get("val_loss")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("inf")
