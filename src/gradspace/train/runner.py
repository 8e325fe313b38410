"""The training driver shared by ``pretrain`` and ``finetune``: restore, train, evaluate, checkpoint, summarise."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..methods import METHODS, preset_projection
from . import runfolder
from .atomic import write_atomic, write_failed
from .config import EVAL_BATCH, FINETUNE, PRETRAIN, UsageError, parse_optim_args
from .export import export_causal_lm, export_classifier
from .interrupt import StopFlag
from .parallel import Parallel, load_parallel, save_parallel, stream_state
from .report import write_run_plots
from .reporters import Reporters
from .reporters import parse as parse_reporters
from .runfolder import RunLock
from .summary import RunDiverged, build_summary, has_diverged, logged_before, logged_by

if TYPE_CHECKING:
    from .encoder import FinetuneSetup
from .streams import Data


def run_training(cfg: dict[str, Any], out: Path, **kwargs) -> dict[str, Any]:
    """The run machinery shared by ``pretrain`` and ``finetune`` (see :func:`_run_training`); the run folder's lock
    is held until the model is exported and released however the run ends."""
    with contextlib.ExitStack() as stack:
        return _run_training(stack, cfg, out, **kwargs)


def _run_training(
    stack: contextlib.ExitStack,
    cfg: dict[str, Any],
    out: Path,
    *,
    command: str,
    model,
    optimizer,
    scheduler,
    stream,
    evaluate_fn,
    settings: dict[str, Any],
    resume: dict | None = None,
    stop_after: int | None = None,
    label: str | None = None,
    no_eval: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    parallel: Parallel | None = None,
    inner=None,
    overwrite: bool = False,
    export=None,
) -> dict[str, Any]:
    """Restore, train, evaluate, checkpoint, export; returns the run's summary.

    Restores a checkpoint (model, optimizer, scheduler, data position, RNG), then prepares the run folder (only now,
    so bad input leaves nothing behind; see ``runfolder.prepare``), trains with metrics.jsonl lines, periodic
    ``evaluate_fn()`` and checkpoints, handles Ctrl-C (save, exit 130), and ends with a final evaluation and
    checkpoint, ``export(model)`` (``RUN/model``) and, last, summary.json: a run folder with a summary is complete.

    Under torchrun (``parallel``; ``model`` wrapped, ``inner`` the unwrapped module) only rank 0 writes files and
    shows progress; see :meth:`save_parallel` for checkpoints.
    """
    import torch
    from tqdm import tqdm

    from . import checkpoint as ck
    from .loop import train

    parallel = parallel or Parallel()
    inner = model if inner is None else inner
    main = parallel.main
    device = next(model.parameters()).device
    start = 0
    if resume is not None:
        start = int(resume["step"])
        if start >= cfg["steps"]:
            raise UsageError(_nothing_to_do(out, start, cfg["steps"], command))
        error = None
        try:
            load_parallel(resume, parallel, model, inner, optimizer)
            if resume.get("scheduler") is not None:
                scheduler.load_state_dict(resume["scheduler"])
            if resume.get("stream") is not None:
                stream.load_state_dict(stream_state(resume))
        except ck.CheckpointError as err:
            error = err
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:200]
            error = ck.CheckpointError(f"checkpoint does not fit this run ({first})")
        parallel.agree(error)
        ck.set_rng_state(resume["rng"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    if main:
        stack.enter_context(RunLock(out, create=True))
        runfolder.prepare(out, resume, overwrite, command)
        write_atomic(out / "config.json", json.dumps(cfg, indent=1))
        # a resumed run drops the lines logged after its checkpoint (they are redone)
        lines = metrics_path.read_text(encoding="utf-8").splitlines() if start and metrics_path.exists() else []
        write_atomic(metrics_path, "".join(ln + "\n" for ln in lines if logged_by(ln, start)))
    # a resumed run's summary covers the whole run: the curves and wall time logged before the checkpoint
    history_before, evals_before, elapsed_before = logged_before(metrics_path) if main and start else ([], [], 0.0)
    metrics = metrics_path.open("a") if main else open(os.devnull, "w")  # noqa: SIM115 - closed below
    reporters = Reporters(parse_reporters(cfg.get("report_to")) if main else [], out, cfg)
    stack.callback(reporters.close)
    evals: list[dict] = evals_before
    seen: list[dict[str, Any]] = []  # every step's loss, for a summary however the run ends
    clock = [time.perf_counter()]

    def log(line: dict[str, Any]) -> None:
        try:
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
        except OSError as err:
            raise write_failed(err, metrics_path, "metrics") from None
        reporters.log(line)

    def do_eval(step: int) -> None:
        if evaluate_fn is None:
            return
        e = {"step": step, **evaluate_fn()}
        evals.append(e)
        log({"type": "eval", **e})
        if main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in e.items() if k != "step" and isinstance(v, float))
            tqdm.write(f"step {step}: {shown}", file=sys.stderr)

    saved: dict[str, int] = {}

    def save(step: int) -> Path:
        if saved.get("step") == step:  # a stop on a save_every step: the state of this step is written already
            return ck.checkpoint_path(ckpt_dir, step)
        saved["step"] = step
        return save_parallel(
            ckpt_dir,
            step,
            parallel,
            model=model,
            inner=inner,
            optimizer=optimizer,
            scheduler=scheduler,
            stream=stream,
            config=cfg,
        )

    bar = tqdm(
        total=cfg["steps"],
        initial=start,
        desc=label or cfg["method"],
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not main or os.environ.get("GRADSPACE_PROGRESS") == "0",  # compare --jobs: no bars
    )

    last: list[dict] = []
    window: list[float] = []  # the losses since the last train line

    def on_step_record(r: dict[str, Any]) -> None:
        if parallel.world > 1:  # the loss of the global batch, the tokens of all ranks
            r["loss"] = parallel.mean(r["loss"])
            r["tokens_per_s"] *= parallel.world
        last[:] = [r]
        seen.append({"step": r["step"], "loss": r["loss"]})
        if math.isfinite(r["loss"]):
            window.append(r["loss"])
        if r["step"] % cfg["log_every"] == 0 or r["step"] == cfg["steps"]:
            mean = sum(window) / len(window) if window else float("nan")  # as the HF Trainer logs it
            window.clear()
            log(
                {
                    "type": "train",
                    "step": r["step"],
                    "loss": mean,
                    "lr": r["lr"],
                    "tokens_per_s": r["tokens_per_s"],
                    "step_time": r["step_time"],
                    "grad_norm": r["grad_norm"],
                    "elapsed": elapsed_before + time.perf_counter() - clock[0],
                }
            )

    with StopFlag(grace=2.0 if parallel.world > 1 else 0.0) as flag:

        def hook(step: int) -> bool:
            bar.update(step - bar.n)
            if last:
                bar.set_postfix(loss=f"{last[0]['loss']:.3f}", tok_s=f"{last[0]['tokens_per_s']:.0f}")
            if cfg["eval_every"] and step % cfg["eval_every"] == 0 and step != cfg["steps"]:
                do_eval(step)
            if cfg["save_every"] and step % cfg["save_every"] == 0 and step != cfg["steps"]:
                save(step)
            if stop_after is not None and step == stop_after:
                flag.request()
            return parallel.any(flag.requested)  # every rank stops at the same step

        clock[0] = time.perf_counter()
        try:
            result = train(
                model,
                optimizer,
                stream,
                cfg["steps"],
                scheduler=scheduler,
                start_step=start,
                grad_accum=cfg["grad_accum"],
                grad_clip=cfg["grad_clip"],
                callback=on_step_record,
                log_every=1,
                step_hook=hook,
                skip_nonfinite=cfg["nonfinite"] == "skip",
                all_finite=parallel.all_ok if parallel.world > 1 else None,
            )
        except KeyboardInterrupt:
            bar.close()
            metrics.close()
            raise UsageError(
                "aborted by a second Ctrl-C without saving; resume from the last checkpoint with "
                f"`gradspace {command} --resume {out}`"
            ) from None
        except FloatingPointError as err:  # a non-finite loss or gradient: the run has diverged
            bar.close()
            metrics.close()
            if main:
                nan = float("nan")
                summary = build_summary(
                    cfg,
                    start,
                    optimizer,
                    device,
                    history=[*history_before, *seen],
                    evals=evals,
                    wall_time=elapsed_before + time.perf_counter() - clock[0],
                    extra={**settings, **(extra or {})},
                    diverged=True,
                    nonfinite=str(err),
                    **dict.fromkeys(("train_loss", "final_loss", "val_loss", "val_ppl", "tokens_per_s"), nan),
                )
                write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
            raise RunDiverged(f"{err} (the run is marked diverged in {out / 'summary.json'})") from None
    bar.close()
    if result["stopped_at"] is not None:
        path = save(result["stopped_at"])
        metrics.close()
        if main:
            print(
                f"gradspace: interrupted at step {result['stopped_at']} of {cfg['steps']}; checkpoint saved to "
                f"{path}\nresume with: gradspace {command} --resume {out}",
                file=sys.stderr,
                flush=True,
            )
        parallel.barrier()  # torchrun stops the other ranks when one exits: rank 0 has said everything by now
        raise SystemExit(143 if flag.signal == signal.SIGTERM else 130)
    do_eval(cfg["steps"])
    save(cfg["steps"])
    metrics.close()
    final = {k: v for k, v in evals[-1].items() if k != "step"} if evals else dict(no_eval or {})
    summary = build_summary(
        cfg,
        start,
        optimizer,
        device,
        history=[*history_before, *({"step": r["step"], "loss": r["loss"]} for r in result["history"])],
        evals=evals,
        wall_time=elapsed_before + result["wall_time"],
        extra={**settings, **(extra or {})},
        train_loss=result["train_loss"],
        final_loss=result["history"][-1]["loss"],
        skipped_steps=result["skipped_steps"] + optimizer.skipped_steps,
        diverged=has_diverged(result["history"], result["train_loss"]),
        **final,
        tokens_per_s=result["tokens_per_s"],
    )
    if export is not None and not summary["diverged"]:
        _export(parallel, out, summary, inner, export)
    if main:
        write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
        lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        summary["plots"] = write_run_plots(out, summary, lines)
    if summary["diverged"]:
        first = next((r["loss"] for r in result["history"] if math.isfinite(r["loss"])), float("nan"))
        raise RunDiverged(
            f"the run diverged: train loss went from {first:.4f} to {result['train_loss']:.4f} (everything is saved "
            f"in {out}); lower --lr (now {settings['lr']:g}), lengthen --warmup, or keep --grad-clip on"
        )
    return summary


def _make_optimizer(
    cfg: dict[str, Any], model, settings: dict[str, Any], default_targets, parallel: Parallel | None = None, **extra
):
    """The method's optimizer with the run's options, its schedule (``transformers.get_scheduler``), and
    layer-wise mode when asked for (under torchrun averaging each gradient over the ranks); bad options are
    one-line errors."""
    from transformers import get_scheduler

    from .. import create_optimizer
    from ..layerwise import Layerwise
    from ..params import DEFAULT_TARGETS

    projection = (
        {}
        if METHODS[cfg["method"]] is None
        else {
            "proj_type": cfg["proj_type"],
            **({"svd": cfg["svd"]} if cfg.get("svd") else {}),
            "target_modules": cfg.get("target_modules") or default_targets or DEFAULT_TARGETS,
        }
    )
    try:
        optimizer = create_optimizer(
            cfg["method"],
            model,
            base=cfg["base"],
            weight_decay=cfg["weight_decay"],
            nonfinite=cfg["nonfinite"],
            **settings,
            **projection,
            **parse_optim_args(cfg.get("optim_args")),
            **extra,
        )
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    warmup = cfg["warmup"] if cfg.get("warmup") is not None else max(1, cfg["steps"] // 10)
    kwargs = {"min_lr_rate": 0.1} if "min_lr" in cfg["scheduler"] else {}
    if cfg["scheduler"] == "warmup_stable_decay":
        kwargs = {"num_decay_steps": max(1, cfg["steps"] // 10)}
    scheduler = get_scheduler(
        cfg["scheduler"],
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=cfg["steps"],
        scheduler_specific_kwargs=kwargs,
    )
    layerwise = None
    if cfg["layerwise"]:  # under torchrun: DDP averages each gradient itself, FSDP2 after each block's reduce-scatter
        ddp = parallel is not None and parallel.strategy == "ddp"
        group = parallel.group if ddp else None
        layerwise = Layerwise(optimizer, accumulation_steps=cfg["grad_accum"], process_group=group)
    return optimizer, scheduler, layerwise


def _prepare_model(cfg: dict[str, Any], model):
    """Gradient checkpointing, as asked."""
    if cfg["grad_checkpointing"]:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise UsageError("--grad-checkpointing needs a Hugging Face model (gradient_checkpointing_enable)")
        from .models import checkpoint_activations

        checkpoint_activations(model)
    return model


def _compiled(cfg: dict[str, Any], model):
    import torch

    return torch.compile(model) if cfg["compile"] else model


def run_pretrain(
    cfg: dict[str, Any],
    out: Path,
    *,
    data: Data | None = None,
    resume: dict | None = None,
    stop_after: int | None = None,
    label: str | None = None,
    parallel: Parallel | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train one run into ``out`` (created only once everything is set up); returns its summary."""
    import torch

    from .loop import evaluate

    PRETRAIN.validate(cfg)
    parallel, device, dtype = _placement(cfg, parallel)
    data = data or Data(cfg, parallel.world)
    stream = parallel.shard(data.stream(parallel.world * cfg["batch_size"]))  # each rank its rows
    torch.manual_seed(cfg["seed"])
    model = _causal_lm(cfg, data.vocab_size).to(device=device, dtype=dtype)
    model, inner = parallel.wrap(_prepare_model(cfg, model), blocks=_blocks(model), layerwise=cfg["layerwise"])
    settings = PRETRAIN.settings(cfg)
    own_rank = "rank" in preset_projection(cfg["method"])
    if cfg.get("model") and METHODS[cfg["method"]] is not None and cfg.get("rank") is None and not own_rank:
        hidden = getattr(inner.config, "hidden_size", None) or getattr(inner.config, "n_embd", 512)
        settings["rank"] = max(1, hidden // 4)  # rank d/4, the papers' ratio
    optimizer, scheduler, _layerwise = _make_optimizer(
        cfg, inner, settings, None, parallel, **_distributed_option(parallel)
    )
    model = _compiled(cfg, model)
    mine = [parallel.rows(b) for b in data.eval_batches]  # every rank its rows of the same validation batches

    def evaluate_fn():
        loss = parallel.mean(evaluate(model, mine)["val_loss"])  # rows of equal length: the global batch's mean
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    summary = run_training(
        cfg,
        out,
        command="pretrain",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        evaluate_fn=evaluate_fn if mine else None,
        settings=settings,
        resume=resume,
        stop_after=stop_after,
        label=label,
        no_eval={"val_loss": float("nan"), "val_ppl": float("nan")},
        parallel=parallel,
        inner=inner,
        overwrite=overwrite,
        export=lambda m, step: export_causal_lm(
            out, m, getattr(data, "dataset", None), getattr(data, "_tok", None), step=step
        ),
    )
    return summary


def _nothing_to_do(out: Path, start: int, steps: int, command: str) -> str:
    from .export import exported_step

    if exported_step(out) == start and (out / "summary.json").exists():
        return f"the checkpoint is at step {start}, the run has {steps} steps: nothing to do (give a larger --steps)"
    return (
        f"the run reached its last step {start}, but its model folder or summary was not written (the run was "
        f"stopped while exporting): `gradspace export {out}` writes {out / 'model'} from the checkpoint; a larger "
        "--steps continues training"
    )


def _export(parallel: Parallel, out: Path, summary: dict[str, Any], inner, write) -> None:
    """Rank 0 writes ``RUN/model`` (a Hugging Face folder; see ``gradspace.train.export``) with
    ``write(model, step)``. Under FSDP2 every rank first gathers the full state (a collective), and rank 0 writes an
    unsharded copy."""
    model = inner
    if parallel.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if parallel.main:
            model = type(inner)(inner.config)
            model.load_state_dict(state)
    if not parallel.main:
        return
    summary["model_folder"] = str(write(model, summary["steps"]))


def _causal_lm(cfg: dict[str, Any], vocab_size: int):
    """The preset's LLaMA, or ``--model``: a local Hugging Face folder (its weights unless ``--fresh``) or config.

    Its broken ``config.json`` or truncated safetensors are one-line errors naming the file; a folder with no
    weights starts from random weights as ``--fresh`` does, and says so, as it does when the tokenizer has fewer
    tokens than the model has embeddings (legitimate, since models pad their vocabularies, but worth knowing)."""
    if not cfg.get("model"):
        from .models import build_llama

        return build_llama(cfg["preset"], vocab_size=vocab_size)
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modelfolder import check_weights, read_config
    from .streams import tokenizer_choice

    path = Path(str(cfg["model"])).expanduser()
    read_config(path.parent if path.is_file() else path)
    weights = path.is_dir() and any(
        (path / f).exists()
        for f in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one notice
    try:
        if weights and not cfg.get("fresh"):
            check_weights(path)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(path.parent if path.is_file() else path, local_files_only=True)
            model = AutoModelForCausalLM.from_config(config)
            if not weights and not cfg.get("fresh") and main:
                print(
                    f"gradspace: --model {path} is a config without weights: training starts from random weights "
                    f"(as --fresh would), with {tokenizer_choice(cfg)[1]}",
                    file=sys.stderr,
                )
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--model {path} does not load as a causal LM ({str(err).splitlines()[0][:200]})") from None
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        raise UsageError(
            f"--model {path} has {rows} token embeddings, fewer "
            f"than the tokenizer's {vocab_size} tokens: give the model's own tokenizer with --tokenizer"
        )
    if rows > vocab_size and main:
        print(
            f"gradspace: --model {path} has {rows:,} token embeddings and the tokenizer {vocab_size:,} tokens: "
            f"the other {rows - vocab_size:,} rows match no token (models often pad their embeddings)",
            file=sys.stderr,
        )
    return model


def _blocks(model):
    """The model's list of transformer blocks (FSDP2 shards each): the largest ModuleList."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else ()


def _placement(cfg: dict[str, Any], parallel: Parallel | None):
    """Threads, process layout, device and dtype of a run (torchrun ranks use their own device)."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    parallel = parallel or Parallel()
    device = torch.device(cfg["device"]) if parallel.world == 1 else parallel.device
    if device.type == "cpu":
        from .allocator import return_freed_memory

        return_freed_memory()
    return parallel, device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["dtype"]]


def _distributed_option(parallel: Parallel) -> dict[str, Any]:
    return {"distributed": parallel.distributed} if parallel.distributed else {}


def run_finetune(
    cfg: dict[str, Any],
    out: Path,
    *,
    setup: FinetuneSetup | None = None,
    resume: dict | None = None,
    stop_after: int | None = None,
    label: str | None = None,
    parallel: Parallel | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``cfg["model"]`` on ``cfg["task"]`` into ``out``; returns the summary (with the final metrics)."""
    import torch

    from .encoder import evaluate_task
    from .tasks import ExampleStream, collate_fn, eval_batches

    FINETUNE.validate(cfg)
    parallel, device, dtype = _placement(cfg, parallel)
    from .encoder import FinetuneSetup

    setup = setup or FinetuneSetup(cfg)
    task = setup.task
    model = setup.model.to(device=device, dtype=dtype)
    model, inner = parallel.wrap(_prepare_model(cfg, model), blocks=_blocks(model), layerwise=cfg["layerwise"])
    settings = FINETUNE.settings(cfg)
    optimizer, scheduler, _layerwise = _make_optimizer(
        cfg, inner, settings, setup.targets, parallel, **_distributed_option(parallel)
    )
    model = _compiled(cfg, model)
    collate = collate_fn(setup.tokenizer, cfg["max_length"], dtype if task.regression else torch.long)
    stream = parallel.shard(ExampleStream(task.train, collate, parallel.world * cfg["batch_size"], seed=cfg["seed"]))
    batches = eval_batches(task.validation, collate, EVAL_BATCH, cfg["eval_batches"] * EVAL_BATCH)
    summary = run_training(
        cfg,
        out,
        command="finetune",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        evaluate_fn=lambda: evaluate_task(model, batches, task.num_labels, task.regression),
        settings=settings,
        resume=resume,
        stop_after=stop_after,
        label=label,
        extra={"task": task.name, "model": cfg["model"], "metric": task.metric},
        parallel=parallel,
        inner=inner,
        overwrite=overwrite,
        export=lambda m, step: export_classifier(out, m, setup.tokenizer, step=step, labels=task.labels),
    )
    return summary
