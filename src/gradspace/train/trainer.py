"""One Trainer runs every recipe: restore, train, evaluate, checkpoint, export, summarise.

A recipe (:class:`Recipe`: model, optimizer, schedule, data, evaluation and export, built by ``recipes.py`` for
pretraining and fine-tuning) is all that differs between commands. The Trainer's parts each keep their own state:
:class:`Checkpoints` (restore, save once per step), :class:`MetricsLog` (metrics.jsonl and the reporters),
:class:`Progress` (the bar), :class:`TrainState` (where the run stands, and what it logged before a resume).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ck
from . import runfolder
from .atomic import write_atomic, write_failed
from .config import UsageError
from .interrupt import StopFlag
from .parallel import Parallel, load_parallel, save_parallel, stream_state
from .summary import RunDiverged, build_summary, has_diverged, logged_before, logged_by


@dataclass
class Recipe:
    """What a command fills in: the Trainer runs any recipe the same way."""

    command: str  #: the command that resumes it (pretrain, finetune)
    model: Any  #: what trains (wrapped under torchrun, compiled with --compile)
    inner: Any  #: the unwrapped module: saved and exported
    optimizer: Any
    scheduler: Any
    stream: Any  #: the training batches, resumable (state_dict)
    settings: dict[str, Any]  #: the optimizer's lr and projection, for the summary
    evaluate: Callable[[int], dict[str, float]] | None = None  #: the figures at a step (written with it)
    export: Callable[[Any, int], Path] | None = None  #: writes RUN/model from (model, step)
    no_eval: dict[str, float] = field(default_factory=dict)  #: the figures of a run that never evaluates
    extra: dict[str, Any] = field(default_factory=dict)  #: more summary fields (task, metric ...)
    layerwise: Any = None  #: the Layerwise stepper of a --layerwise run, kept with it
    after_step: Callable[[int], None] | None = None  #: a baseline's work after a step (ReLoRA's restarts)


@dataclass
class TrainState:
    """Where a run stands: its first step (the checkpoint's, on resume) and what it logged, before the resume
    (read back from metrics.jsonl, so a resumed run's summary covers the whole run) and since."""

    start: int = 0
    history_before: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0
    seen: list[dict[str, Any]] = field(default_factory=list)  #: every step's loss, however the run ends
    clock: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.clock


#: where a step's time went (``gradspace.train.loop``), logged with the step: the logged step's own, not a window's
TIMES = ("forward_time", "backward_time", "optimizer_time", "subspace_update_time")


class MetricsLog:
    """``metrics.jsonl`` and the ``--report-to`` reporters (rank 0 only): a train line every ``log_every`` steps
    with the mean loss of its window (as the Hugging Face Trainer logs it), and an eval line per evaluation."""

    def __init__(self, out: Path, cfg: dict[str, Any], main: bool):
        from .reporters import Reporters
        from .reporters import parse as parse_reporters

        self.path, self.cfg = out / "metrics.jsonl", cfg
        self.file = self.path.open("a") if main else open(os.devnull, "w")  # noqa: SIM115 - closed by close()
        self.reporters = Reporters(parse_reporters(cfg.get("report_to")) if main else [], out, cfg)
        self.window: list[float] = []

    def write(self, line: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        except OSError as err:
            raise write_failed(err, self.path, "metrics") from None
        self.reporters.log(line)

    def step(self, r: dict[str, Any], elapsed: float) -> None:
        if math.isfinite(r["loss"]):
            self.window.append(r["loss"])
        if r["step"] % self.cfg["log_every"] and r["step"] != self.cfg["steps"]:
            return
        mean = sum(self.window) / len(self.window) if self.window else float("nan")
        self.window.clear()
        keys = ("lr", "tokens_per_s", "step_time", "grad_norm", *TIMES)
        record = {k: r[k] for k in keys if k in r}
        self.write({"type": "train", "step": r["step"], "loss": mean, **record, "elapsed": elapsed})

    def close(self) -> None:
        self.file.close()
        self.reporters.close()


class Progress:
    """The progress bar (rank 0; none under ``compare --jobs``, whose children would garble the terminal)."""

    def __init__(self, cfg: dict[str, Any], start: int, label: str | None, main: bool):
        from tqdm import tqdm

        self.tqdm = tqdm
        disable = not main or os.environ.get("GRADSPACE_PROGRESS") == "0"
        self.bar = tqdm(
            total=cfg["steps"],
            initial=start,
            desc=label or cfg["method"],
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=disable,
        )
        self.main = main

    def update(self, step: int, last: dict[str, Any] | None) -> None:
        self.bar.update(step - self.bar.n)
        if last:
            self.bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")

    def say(self, text: str) -> None:
        if self.main:
            self.tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class Checkpoints:
    """Restores a checkpoint into the recipe (every rank agrees whether it fits) and saves ``ckpt-<step>`` once per
    step (a stop on a ``--save-every`` step writes nothing twice); see :func:`save_parallel` for the layouts."""

    def __init__(self, out: Path, cfg: dict[str, Any], recipe: Recipe, parallel: Parallel):
        self.folder, self.cfg, self.recipe, self.parallel = out / "checkpoints", cfg, recipe, parallel
        self.saved: int | None = None

    def restore(self, resume: dict[str, Any]) -> None:
        r, error = self.recipe, None
        try:
            load_parallel(resume, self.parallel, r.model, r.inner, r.optimizer)
            if resume.get("scheduler") is not None:
                r.scheduler.load_state_dict(resume["scheduler"])
                _rates_now(r.scheduler, r.optimizer)
            if resume.get("stream") is not None:
                r.stream.load_state_dict(stream_state(resume))
        except ck.CheckpointError as err:
            error = err
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:200]
            error = ck.CheckpointError(f"checkpoint does not fit this run ({first})")
        self.parallel.agree(error)
        resume["model"] = resume["optimizer"] = None  # held by the model and optimizer now: a 7B keeps one copy
        ck.set_rng_state(resume["rng"])
        if Path(resume.get("path", "")).parent.resolve() == self.folder.resolve():
            self.saved = int(resume["step"])  # that checkpoint is this folder's already: not written again

    def save(self, step: int) -> Path:
        if self.saved != step:
            self.saved = step
            r = self.recipe
            save_parallel(
                self.folder,
                step,
                self.parallel,
                model=r.model,
                inner=r.inner,
                optimizer=r.optimizer,
                scheduler=r.scheduler,
                stream=r.stream,
                config=self.cfg,
            )
        return ck.checkpoint_path(self.folder, step)


class Trainer:
    """Runs a :class:`Recipe` into the run folder ``out``; :meth:`run` returns the run's summary.

    Restores ``resume`` (model, optimizer, scheduler, data position, RNG), then prepares the folder under its lock
    (only now, so bad input leaves nothing behind; see ``runfolder.prepare``), trains with metrics lines, periodic
    evaluations and checkpoints, stops on Ctrl-C or SIGTERM with a checkpoint (exit 130 or 143), and ends with a
    final evaluation and checkpoint, the export (``RUN/model``) and, last, summary.json: a folder with a summary is
    a finished run. Under torchrun only rank 0 writes files and shows progress."""

    def __init__(
        self,
        cfg: dict[str, Any],
        out: Path,
        recipe: Recipe,
        *,
        parallel: Parallel | None = None,
        resume: dict[str, Any] | None = None,
        stop_after: int | None = None,
        label: str | None = None,
        overwrite: bool = False,
    ):
        self.cfg, self.out, self.recipe = cfg, Path(out), recipe
        self.parallel = parallel or Parallel()
        self.resume, self.stop_after, self.label, self.overwrite = resume, stop_after, label, overwrite
        self.checkpoints = Checkpoints(self.out, cfg, recipe, self.parallel)
        self.state = TrainState(start=int(resume["step"]) if resume else 0)
        self.device = next(recipe.model.parameters()).device

    def run(self) -> dict[str, Any]:
        """The run, start to end; the folder's lock is held until the export and released however it ends."""
        import torch

        completing = False
        if self.resume is not None:
            completing = _check_start(self.out, self.state.start, self.cfg["steps"])
            self.checkpoints.restore(self.resume)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with contextlib.ExitStack() as stack:
            self._prepare_folder(stack)
            self.metrics = MetricsLog(self.out, self.cfg, self.parallel.main)
            stack.callback(self.metrics.close)
            self.progress = Progress(self.cfg, self.state.start, self.label, self.parallel.main)
            stack.callback(self.progress.close)
            if completing:  # stopped after its last checkpoint, before its export or summary: finish it
                self.progress.say(f"the run reached step {self.state.start}; writing its model folder and summary")
                return self._finish(self._logged_result())
            result = self._train()
            return self._finish(result)

    def _prepare_folder(self, stack: contextlib.ExitStack) -> None:
        """Rank 0: the lock, the folder made ready for this run, config.json, and metrics.jsonl without the lines
        logged after the checkpoint (they are redone), read back into the state."""
        if not self.parallel.main:
            return
        out, start = self.out, self.state.start
        stack.enter_context(runfolder.RunLock(out, create=True))
        runfolder.prepare(out, self.resume, self.overwrite, self.recipe.command)
        write_atomic(out / "config.json", json.dumps(self.cfg, indent=1))
        path = out / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if start and path.exists() else []
        kept = [ln for ln in lines if logged_by(ln, start)]
        broken = [i + 1 for i, ln in enumerate(lines[:-1]) if ln.strip() and not _parses(ln)]
        if broken:  # a half-written last line is a kill's; one further up means the file was damaged
            shown = ", ".join(map(str, broken[:5])) + (" ..." if len(broken) > 5 else "")
            print(f"gradspace: warning: {path} has unreadable lines ({shown}); they are dropped", file=sys.stderr)
        write_atomic(path, "".join(ln + "\n" for ln in kept))
        if start:
            s = self.state
            s.history_before, s.evals, s.elapsed_before = logged_before(path)

    def _evaluate(self, step: int) -> None:
        if self.recipe.evaluate is None:
            return
        e = {"step": step, **self.recipe.evaluate(step)}
        self.state.evals.append(e)
        self.metrics.write({"type": "eval", **e})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in e.items() if k != "step" and isinstance(v, float))
        self.progress.say(f"step {step}: {shown}")

    def _record(self, r: dict[str, Any]) -> None:
        """Each step's record: the loss of the global batch under torchrun, into the state and the metrics."""
        if self.parallel.world > 1:
            r["loss"] = self.parallel.mean(r["loss"])
            r["tokens_per_s"] *= self.parallel.world
        self.last = r
        self.state.seen.append({"step": r["step"], "loss": r["loss"]})
        self.metrics.step(r, self.state.elapsed())

    def _train(self) -> dict[str, Any]:
        from .loop import train

        cfg, recipe, parallel = self.cfg, self.recipe, self.parallel
        self.last = None
        with StopFlag(grace=2.0 if parallel.world > 1 else 0.0) as flag:

            def hook(step: int) -> bool:
                if recipe.after_step is not None:
                    recipe.after_step(step)
                self.progress.update(step, self.last)
                if cfg["eval_every"] and step % cfg["eval_every"] == 0 and step != cfg["steps"]:
                    self._evaluate(step)
                if cfg["save_every"] and step % cfg["save_every"] == 0 and step != cfg["steps"]:
                    self.checkpoints.save(step)
                if self.stop_after is not None and step == self.stop_after:
                    flag.request()
                return parallel.any(flag.requested)  # every rank stops at the same step

            self.state.clock = time.perf_counter()
            try:
                result = train(
                    recipe.model,
                    recipe.optimizer,
                    recipe.stream,
                    cfg["steps"],
                    scheduler=recipe.scheduler,
                    start_step=self.state.start,
                    grad_accum=cfg["grad_accum"],
                    grad_clip=cfg["grad_clip"],
                    callback=self._record,
                    log_every=1,
                    step_hook=hook,
                    skip_nonfinite=cfg["nonfinite"] == "skip",
                    all_finite=parallel.all_ok if parallel.world > 1 else None,
                    world=parallel.world,
                    token_total=parallel.total if parallel.world > 1 else None,
                )
            except KeyboardInterrupt:
                raise UsageError(
                    "aborted by a second Ctrl-C without saving; resume from the last checkpoint with "
                    f"`gradspace {recipe.command} --resume {self.out}`"
                ) from None
            except FloatingPointError as err:  # a non-finite loss or gradient: the run has diverged
                self._mark_diverged(str(err))
                raise RunDiverged(f"{err} (the run is marked diverged in {self.out / 'summary.json'})") from None
        if result["stopped_at"] is not None:
            self._stopped(result["stopped_at"], flag.signal)
        return result

    def _stopped(self, step: int, signum) -> None:
        """Ctrl-C or SIGTERM: the checkpoint of this step, what to run next, exit 130 (143 for SIGTERM)."""
        path = self.checkpoints.save(step)
        if self.parallel.main:
            self.progress.close()
            print(
                f"gradspace: interrupted at step {step} of {self.cfg['steps']}; checkpoint saved to {path}\n"
                f"resume with: gradspace {self.recipe.command} --resume {self.out}",
                file=sys.stderr,
                flush=True,
            )
        self.parallel.barrier()  # torchrun stops the other ranks when one exits: rank 0 has said everything by now
        raise SystemExit(143 if signum == signal.SIGTERM else 130)

    def _summary(self, **figures) -> dict[str, Any]:
        s, r = self.state, self.recipe
        return build_summary(
            self.cfg,
            s.start,
            r.optimizer,
            self.device,
            evals=s.evals,
            extra={**r.settings, **r.extra},
            **figures,
        )

    def _mark_diverged(self, reason: str) -> None:
        if not self.parallel.main:
            return
        nan = float("nan")
        summary = self._summary(
            history=[*self.state.history_before, *self.state.seen],
            wall_time=self.state.elapsed(),
            diverged=True,
            nonfinite=reason,
            **dict.fromkeys(("train_loss", "final_loss", "val_loss", "val_ppl", "tokens_per_s"), nan),
        )
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=1, default=str))

    def _logged_result(self) -> dict[str, Any]:
        """What training returns, for a run whose last step is already done: its figures as metrics.jsonl logged
        them (the last window's mean loss and speed)."""
        lines = [json.loads(x) for x in self.metrics.path.read_text().splitlines() if _parses(x)]
        last = next((x for x in reversed(lines) if x.get("type") == "train"), {})
        nan = float("nan")
        loss = last.get("loss", nan)
        return {"history": [], "wall_time": 0.0, "train_loss": loss, "final_loss": loss, "skipped_steps": 0} | {
            "tokens_per_s": last.get("tokens_per_s", nan)
        }

    def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """The final evaluation and checkpoint, the export, the plots and, last, summary.json; a run that ended far
        above where it started is saved and then raises :class:`RunDiverged`."""
        from .report import write_run_plots

        cfg, state, recipe = self.cfg, self.state, self.recipe
        if not any(e["step"] == cfg["steps"] for e in state.evals):
            self._evaluate(cfg["steps"])
        self.checkpoints.save(cfg["steps"])
        self.metrics.file.flush()
        final = {k: v for k, v in state.evals[-1].items() if k != "step"} if state.evals else dict(recipe.no_eval)
        history = result["history"]
        curve = [*state.history_before, *({"step": r["step"], "loss": r["loss"]} for r in history)]
        summary = self._summary(
            history=curve,
            wall_time=state.elapsed_before + result["wall_time"],
            train_loss=result["train_loss"],
            final_loss=history[-1]["loss"] if history else result["final_loss"],
            skipped_steps=result["skipped_steps"] + recipe.optimizer.skipped_steps,
            diverged=has_diverged(history or curve, result["train_loss"]),
            **final,
            tokens_per_s=result["tokens_per_s"],
        )
        if recipe.export is not None and not summary["diverged"]:
            recipe.optimizer.state.clear()  # saved and summarised: the export has the memory (7B: 7 GiB of state)
            path = export_model(self.parallel, recipe.inner, recipe.export, cfg["steps"])
            if path is not None:
                summary["model_folder"] = str(path)
        if self.parallel.main:  # the plots first: a folder with a summary.json is a finished run
            lines = [json.loads(x) for x in self.metrics.path.read_text().splitlines() if x.strip()]
            summary["plots"] = write_run_plots(self.out, summary, lines)
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=1, default=str))
        if summary["diverged"]:
            first = next((r["loss"] for r in history if math.isfinite(r["loss"])), float("nan"))
            raise RunDiverged(
                f"the run diverged: train loss went from {first:.4f} to {result['train_loss']:.4f} (everything is "
                f"saved in {self.out}); lower --lr (now {recipe.settings['lr']:g}), lengthen --warmup, or keep "
                "--grad-clip on"
            )
        return summary


def _rates_now(scheduler, optimizer) -> None:
    """The learning rates of the restored step under this run's schedule: with more ``--steps`` the schedule is
    rebuilt, and the first resumed step already follows it (the same rates, bit for bit, when nothing changed)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates


def export_model(parallel: Parallel, inner, write: Callable[[Any, int], Path], step: int) -> Path | None:
    """Rank 0 writes ``RUN/model`` with ``write(model, step)`` and returns its path (None on the other ranks).
    Under FSDP2 every rank first gathers the full state (a collective), and rank 0 writes an unsharded copy."""
    model = inner
    if parallel.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if parallel.main:
            model = type(inner)(inner.config)
            model.load_state_dict(state)
    return write(model, step) if parallel.main else None


def _check_start(out: Path, start: int, steps: int) -> bool:
    """Whether a resume at ``start`` of a run of ``steps`` only completes it (its model folder or summary was not
    written: it was stopped while exporting); an error when there is nothing to do."""
    from .export import exported_step

    if start > steps:
        raise UsageError(
            f"the checkpoint is at step {start}, past this run's {steps} steps; give --steps {start} or more"
        )
    if start < steps:
        return False
    if exported_step(out) == start and (out / "summary.json").exists():
        raise UsageError(
            f"the checkpoint is at step {start}, the run has {steps} steps: nothing to do (give a larger --steps)"
        )
    return True


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
