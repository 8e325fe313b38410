"""The recipes: what pretraining and fine-tuning fill in for the Trainer (model, data, optimizer, evaluation,
export), from a run's config; the parts they share are built once, in :func:`_assemble`.

    summary = run_pretrain(cfg, out)        # or run_finetune(cfg, out); the CLI resolves cfg and resume
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..baselines import baseline_of, is_projected
from ..methods import preset_projection
from .config import EVAL_BATCH, FINETUNE, PRETRAIN, Command, UsageError, parse_optim_args
from .parallel import Parallel
from .trainer import Recipe, Trainer

if TYPE_CHECKING:
    from .encoder import FinetuneSetup
    from .streams import Data


def run_pretrain(cfg: dict[str, Any], out: Path, *, data: Data | None = None, **run) -> dict[str, Any]:
    """Pretrain one run into ``out`` (created only once everything is set up); returns its summary. ``run``:
    the :class:`Trainer`'s options (``resume``, ``stop_after``, ``label``, ``parallel``, ``overwrite``)."""
    parallel = _placement(cfg, run.pop("parallel", None))
    recipe = pretrain_recipe(cfg, out, parallel, data, resume=run.get("resume"))
    return Trainer(cfg, out, recipe, parallel=parallel, **run).run()


def run_finetune(cfg: dict[str, Any], out: Path, *, setup=None, **run) -> dict[str, Any]:
    """Fine-tune ``cfg["model"]`` on ``cfg["task"]`` into ``out``; returns the summary (with the final metrics).
    ``setup``: what :func:`finetune_setup` loaded (loaded here when not given)."""
    from .sft import SFTSetup

    parallel = _placement(cfg, run.pop("parallel", None))
    setup = setup or finetune_setup(cfg)
    build = sft_recipe if isinstance(setup, SFTSetup) else finetune_recipe
    return Trainer(cfg, out, build(cfg, out, parallel, setup), parallel=parallel, **run).run()


def finetune_setup(cfg: dict[str, Any]):
    """A classifier's setup (:class:`FinetuneSetup`) or supervised fine-tuning's (:class:`~.sft.SFTSetup`), by
    ``--objective``; ``auto`` is sft when ``--task`` is instruction data."""
    from .encoder import FinetuneSetup
    from .sft import SFTSetup, is_instruction_file

    FINETUNE.validate(cfg)
    objective = cfg["objective"]
    if objective == "auto":
        objective = "sft" if is_instruction_file(str(cfg["task"])) else "classify"
    if objective == "sft":
        _check_files(str(cfg["task"]))
    if objective == "sft" and not is_instruction_file(str(cfg["task"])):
        raise UsageError(
            f"--objective sft needs instruction data: --task {cfg['task']} is not synth-instruct or a file of "
            "alpaca (instruction/output), chat (messages) or prompt/completion rows"
        )
    if objective == "sft" and str(cfg["model"]).lower() in ("minilm", "all-minilm-l6-v2"):
        raise UsageError(
            "instruction tuning needs a causal LM: --model smollm2 (built in) or a folder (LLaMA, Qwen, GPT-2, ...)"
        )
    cfg["objective"] = objective  # kept in the run's config: an export or resume needs no second guess
    return SFTSetup(cfg) if objective == "sft" else FinetuneSetup(cfg)


def _check_files(task: str) -> None:
    """A missing instruction file is named as missing (not as data of the wrong kind)."""
    from .sft import BUILTIN, SUFFIXES

    named = [p.strip() for p in task.split(",") if p.strip() and task not in BUILTIN]
    looks = [p for p in named if Path(p).suffix.lower() in SUFFIXES or "/" in p]  # a file name, not a task name
    missing = [p for p in looks if not Path(p).expanduser().is_file()]
    if missing:
        raise UsageError(f"instruction data {', '.join(missing)} does not exist")


def pretrain_recipe(
    cfg: dict[str, Any], out: Path, parallel: Parallel, data: Data | None = None, resume: dict | None = None
) -> Recipe:
    """A causal LM (a LLaMA preset or ``--model``) on a corpus: validation loss and perplexity on fixed batches,
    exported with a tokenizer that fits it. A preset resumed from a one-file checkpoint is built from the
    checkpoint's tensors (``build_llama(state=...)``), so its weights are held once."""
    import torch

    from .export import export_causal_lm
    from .loop import evaluate
    from .streams import Data

    PRETRAIN.validate(cfg)
    data = data or Data(cfg, parallel.world)
    stream = parallel.shard(data.stream(parallel.world * cfg["batch_size"]))  # each rank its rows
    torch.manual_seed(cfg["seed"])
    own_build = resume and not resume.get("dcp") and parallel.world == 1 and baseline_of(cfg["method"]) is None
    state = resume.get("model") if own_build else None  # a baseline's checkpoint holds its adapters or factors
    model = _causal_lm(cfg, data.vocab_size, state)
    settings = PRETRAIN.settings(cfg)
    own_rank = "rank" in preset_projection(cfg["method"])
    if cfg.get("model") and is_projected(cfg["method"]) and cfg.get("rank") is None and not own_rank:
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 512)
        settings["rank"] = max(1, hidden // 4)  # rank d/4, the papers' ratio
    budget = _rank_budget(cfg, model, settings, parallel) if cfg.get("memory_budget") else None
    recipe = _assemble(cfg, PRETRAIN, model, parallel, settings, targets=None, stream=stream, budget=budget)
    mine = [parallel.rows(b) for b in data.eval_batches]  # every rank its rows of the same validation batches

    def evaluate_fn(step: int) -> dict[str, float]:
        loss = parallel.mean(evaluate(recipe.model, mine)["val_loss"])  # rows of equal length: the global mean
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    recipe.evaluate = evaluate_fn if mine else None
    recipe.no_eval = {"val_loss": float("nan"), "val_ppl": float("nan")}
    dataset, tokenizer = getattr(data, "dataset", None), getattr(data, "_tok", None)
    write = lambda m, step: export_causal_lm(out, m, dataset, tokenizer, step=step)  # noqa: E731
    recipe.export = baseline_export(cfg, out, write, adapter=bool(cfg.get("model")))
    return recipe


def finetune_recipe(cfg: dict[str, Any], out: Path, parallel: Parallel, setup: FinetuneSetup | None = None) -> Recipe:
    """A pretrained encoder with a fresh head on a classification or regression task: the task's metric on its
    validation split, exported with the task's class names."""
    import torch

    from .encoder import FinetuneSetup, evaluate_task
    from .export import export_classifier
    from .tasks import ExampleStream, collate_fn, eval_batches

    FINETUNE.validate(cfg)
    setup = setup or FinetuneSetup(cfg)
    task = setup.task
    dtype = _dtype(cfg)
    collate = collate_fn(setup.tokenizer, cfg["max_length"], dtype if task.regression else torch.long)
    stream = parallel.shard(ExampleStream(task.train, collate, parallel.world * cfg["batch_size"], seed=cfg["seed"]))
    recipe = _assemble(
        cfg, FINETUNE, setup.model, parallel, FINETUNE.settings(cfg), targets=setup.targets, stream=stream
    )
    batches = eval_batches(task.validation, collate, EVAL_BATCH, cfg["eval_batches"] * EVAL_BATCH)
    recipe.evaluate = lambda step: evaluate_task(recipe.model, batches, task.num_labels, task.regression)
    recipe.extra.update(task=task.name, model=cfg["model"], metric=task.metric)
    recipe.export = baseline_export(
        cfg, out, lambda m, step: export_classifier(out, m, setup.tokenizer, step=step, labels=task.labels)
    )
    return recipe


def sft_recipe(cfg: dict[str, Any], out: Path, parallel: Parallel, setup) -> Recipe:
    """A causal LM on instruction data, the loss on its responses (:mod:`.sft`): held-out response loss and
    exact match, exported with a tokenizer whose chat template is the one trained on."""
    from .export import export_causal_lm
    from .sft import evaluator
    from .tasks import ExampleStream

    stream = parallel.shard(
        ExampleStream(setup.train, setup.collate, parallel.world * cfg["batch_size"], seed=cfg["seed"])
    )
    recipe = _assemble(cfg, FINETUNE, setup.model, parallel, FINETUNE.settings(cfg), targets=None, stream=stream)
    generate = parallel.world == 1 and cfg["eval_prompts"] > 0  # greedy decoding of a sharded model: not here
    recipe.evaluate = evaluator(setup, recipe, out, cfg["eval_prompts"], cfg["eval_batches"] * 8, generate)
    recipe.no_eval = {"val_loss": float("nan"), "val_ppl": float("nan")}
    metric = "exact_match" if generate else "val_loss"
    recipe.extra.update(task=setup.task_name, model=cfg["model"], metric=metric, **setup.summary())
    tokenizer = with_chat_template(setup)
    write = lambda m, step: export_causal_lm(out, m, None, tokenizer, step=step)  # noqa: E731
    recipe.export = baseline_export(cfg, out, write)
    return recipe


def with_chat_template(setup):
    """The tokenizer of an instruction-tuned run, carrying the chat template it trained with (a named one as
    Jinja), so the exported folder formats prompts as training did."""
    from .chat import TEMPLATES, jinja

    if setup.template in TEMPLATES:
        setup.tokenizer.chat_template = jinja(setup.template)
    return setup.tokenizer


def _assemble(
    cfg: dict[str, Any],
    command: Command,
    model,
    parallel: Parallel,
    settings: dict[str, Any],
    *,
    targets,
    stream,
    budget=None,
) -> Recipe:
    """What every recipe shares: the model on its device and dtype, gradient checkpointing, the torchrun wrapper,
    the optimizer and schedule (layer-wise when asked), ``torch.compile``. ``budget``: the optimizer-state bytes
    whose ranks the first batch's gradients choose, or the ranks chosen (``gradspace.ranks``)."""
    import torch

    from .precision import store_weights

    device = torch.device(cfg["device"]) if parallel.world == 1 else parallel.device
    if cfg["dtype"] == "int8" and parallel.world > 1:
        raise UsageError("--dtype int8 under torchrun is not supported yet: use --dtype bfloat16")
    model = store_weights(model.to(device=device), cfg, cfg.get("target_modules") or targets)
    model = prepare_baseline(cfg, model, settings, targets, command)
    model, inner = parallel.wrap(_prepare_model(cfg, model), blocks=_blocks(model), layerwise=cfg["layerwise"])
    distributed = {"distributed": parallel.distributed} if parallel.distributed else {}
    if budget is not None:
        distributed["memory_budget"] = budget
        if not isinstance(budget, dict):
            _first_gradients(inner, stream)
    optimizer, scheduler, layerwise = _make_optimizer(cfg, inner, settings, targets, parallel, **distributed)
    if budget is not None:  # the allocation, with the run's config in every checkpoint: a resume rebuilds it
        inner.zero_grad(set_to_none=True)
        names = {id(p): n for n, p in inner.named_parameters()}
        cfg["budget_ranks"] = {
            names[id(p)]: g["rank"] for g in optimizer.param_groups if "rank" in g for p in g["params"]
        }
    model = torch.compile(model) if cfg["compile"] else model
    baseline = baseline_of(cfg["method"])
    if baseline is not None:
        scheduler = baseline.schedule(scheduler, _own(cfg), cfg["steps"])
        trainable = baseline.trainable(inner, optimizer)
    else:
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return Recipe(
        command=command.name,
        model=model,
        inner=inner,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        settings=settings,
        layerwise=layerwise,
        extra={"trainable_params": trainable},
        after_step=None
        if baseline is None
        else lambda step: baseline.after_step(inner, optimizer, step, _own(cfg), cfg["steps"], cfg["seed"]),
    )


def _own(cfg: dict[str, Any]) -> dict[str, Any]:
    """A baseline's own options (the rest of ``--optim-args`` is its inner rule's)."""
    return baseline_of(cfg["method"]).options(parse_optim_args(cfg.get("optim_args")))[0]


def prepare_baseline(cfg: dict[str, Any], model, settings: dict[str, Any], targets, command: Command):
    """The model a baseline trains (adapters added, weights factorised); the model itself for the other methods.
    Used by the recipes and by ``gradspace export``, so a checkpoint loads into the model it was saved from."""
    baseline = baseline_of(cfg["method"])
    if baseline is None:
        return model
    try:
        return baseline.prepare(
            model, _own(cfg), settings.get("rank"), cfg.get("target_modules") or targets, command is PRETRAIN
        )
    except ValueError as err:
        raise UsageError(f"method {cfg['method']}: {err}") from None


def baseline_export(cfg: dict[str, Any], out: Path, write, adapter: bool = True):
    """``write(model, step)`` for a baseline's run: its peft adapter folder first (``RUN/adapter``, when there is a
    base model to load it onto), then the merged model through ``write``."""
    baseline = baseline_of(cfg["method"])
    if baseline is None:
        return write

    def export(model, step: int):
        from .atomic import atomic_folder

        peft = baseline.adapter(model) if adapter else None
        if peft is not None:
            with atomic_folder(out / "adapter", "adapter folder") as tmp:
                peft.save_pretrained(tmp)
        return write(baseline.merged(model), step)

    return export


def _make_optimizer(
    cfg: dict[str, Any], model, settings: dict[str, Any], default_targets, parallel: Parallel | None = None, **extra
):
    """The method's optimizer with the run's options, its schedule and layer-wise mode when asked for; bad
    options are one-line errors."""
    from .. import create_optimizer
    from ..params import DEFAULT_TARGETS

    baseline = baseline_of(cfg["method"])
    if baseline is not None:
        return _baseline_optimizer(cfg, baseline, model, settings)
    projection = (
        {}
        if not is_projected(cfg["method"])
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
            weight_rounding=cfg["weight_rounding"],
            **settings,
            **projection,
            **parse_optim_args(cfg.get("optim_args")),
            **extra,
        )
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    return optimizer, _schedule(cfg, optimizer), _layerwise(cfg, optimizer, parallel)


def _baseline_optimizer(cfg: dict[str, Any], baseline, model, settings: dict[str, Any]):
    own, rule = baseline.options(parse_optim_args(cfg.get("optim_args")))
    try:
        optimizer = baseline.optimizer(
            model,
            settings["lr"],
            cfg["base"],
            rule,
            own,
            cfg.get("task") is None,
            weight_decay=cfg["weight_decay"],
            nonfinite=cfg["nonfinite"],
            weight_rounding=cfg["weight_rounding"],
        )
    except (ValueError, TypeError) as err:
        raise UsageError(f"method {cfg['method']}: {err}") from None
    return optimizer, _schedule(cfg, optimizer), None


def _schedule(cfg: dict[str, Any], optimizer):
    """The run's schedule (``transformers.get_scheduler``)."""
    from transformers import get_scheduler

    warmup = cfg["warmup"] if cfg.get("warmup") is not None else max(1, cfg["steps"] // 10)
    kwargs = {"min_lr_rate": 0.1} if "min_lr" in cfg["scheduler"] else {}
    if cfg["scheduler"] == "warmup_stable_decay":
        kwargs = {"num_decay_steps": max(1, cfg["steps"] // 10)}
    return get_scheduler(
        cfg["scheduler"],
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=cfg["steps"],
        scheduler_specific_kwargs=kwargs,
    )


def _layerwise(cfg: dict[str, Any], optimizer, parallel: Parallel | None):
    """Layer-wise mode when asked for (under torchrun averaging each gradient over the ranks)."""
    from ..layerwise import Layerwise

    layerwise = None
    if cfg["layerwise"]:  # under torchrun: DDP averages each gradient itself, FSDP2 after each block's reduce-scatter
        ddp = parallel is not None and parallel.strategy == "ddp"
        group = parallel.group if ddp else None
        layerwise = Layerwise(optimizer, accumulation_steps=cfg["grad_accum"], process_group=group)
    return layerwise


def _rank_budget(cfg: dict[str, Any], model, settings: dict[str, Any], parallel: Parallel):
    """``--memory-budget``: the ranks a resumed run recorded, or the optimizer-state bytes left of the budget once
    everything else the run's plan holds (weights, gradients, activations ...) is counted."""
    from ..plan.fit import setup_of
    from ..plan.memory import plan_memory
    from ..sizes import parse_bytes

    if not is_projected(cfg["method"]):
        raise UsageError("--memory-budget chooses the ranks of a projected method; adamw trains in full rank")
    if parallel.world > 1:
        raise UsageError("--memory-budget under torchrun is not supported yet: give --rank")
    if cfg.get("budget_ranks"):
        return dict(cfg["budget_ranks"])
    try:
        budget = parse_bytes(cfg["memory_budget"])
    except ValueError as err:
        raise UsageError(f"--memory-budget: {err}") from None
    import torch

    with torch.device("meta"):
        meta = type(model)(model.config)
    plan = plan_memory(meta, setup_of({**cfg, "rank": settings.get("rank")}))
    state = sum(x.bytes for x in plan.lines if "state" in x.part or "moments" in x.part)
    left = budget - (plan.peak - state)
    if left <= 0:
        raise UsageError(
            f"--memory-budget {cfg['memory_budget']}: the run needs {(plan.peak - state) / 2**30:.2f} GiB besides "
            "its optimizer state (gradspace plan shows where); give a larger budget"
        )
    return left


def _first_gradients(model, stream) -> None:
    """The gradients of the first training batch, which ``memory_budget`` allocates ranks by; the stream is put
    back where it was, so training still starts with that batch."""
    from .loop import _model_inputs

    state = stream.state_dict()
    batch = next(stream)
    stream.load_state_dict(state)
    device = next(model.parameters()).device
    model(**_model_inputs(batch, device)).loss.backward()


def _prepare_model(cfg: dict[str, Any], model):
    """Gradient checkpointing, as asked."""
    if cfg["grad_checkpointing"]:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise UsageError("--grad-checkpointing needs a Hugging Face model (gradient_checkpointing_enable)")
        from .models import checkpoint_activations

        checkpoint_activations(model)
    return model


def _causal_lm(cfg: dict[str, Any], vocab_size: int, state: dict | None = None):
    """The preset's LLaMA, or ``--model``: a local Hugging Face folder (its weights unless ``--fresh``) or config.

    Its broken ``config.json`` or truncated safetensors are one-line errors naming the file; a folder with no
    weights starts from random weights as ``--fresh`` does, and says so, as it does when the tokenizer has fewer
    tokens than the model has embeddings (legitimate, since models pad their vocabularies, but worth knowing)."""
    if not cfg.get("model"):
        from .models import build_llama
        from .precision import int8_group_size

        group = int8_group_size(cfg)
        if state is not None:
            try:
                return build_llama(cfg["preset"], vocab_size, dtype=_dtype(cfg), int8_group_size=group, state=state)
            except (KeyError, TypeError, RuntimeError):
                pass  # not this model's state: built as usual, and the restore says what does not fit
        return build_llama(cfg["preset"], vocab_size, dtype=_dtype(cfg), int8_group_size=group)
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
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_dtype(cfg))
        else:
            config = AutoConfig.from_pretrained(path.parent if path.is_file() else path, local_files_only=True)
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype(cfg))
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


def _dtype(cfg: dict[str, Any]):
    from .precision import compute_dtype

    return compute_dtype(cfg)


def _placement(cfg: dict[str, Any], parallel: Parallel | None) -> Parallel:
    """Threads and process layout of a run (torchrun ranks use their own device); on the CPU, freed memory goes
    back to the OS."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    parallel = parallel or Parallel()
    if (torch.device(cfg["device"]) if parallel.world == 1 else parallel.device).type == "cpu":
        from .allocator import return_freed_memory

        return_freed_memory()
    return parallel
