"""Real training steps at scale, each configuration in its own process: peak memory next to the formula, split into
weights, gradients, optimizer state and the rest (activations and transients).

``python -m gradspace.bench memory --real --preset 1b``: LLaMA (vocabulary 32,000, float32), batch 1 x 256 tokens
(``--real-seq-len``), gradient checkpointing, randomized SVD where the tracker takes SVDs, 2 steps (``--real-steps``).
On CPU the peak is the process's peak RSS, with gradspace's allocator setting (``gradspace.train.allocator``, what
the CLI uses); on CUDA ``torch.cuda.max_memory_allocated``. A configuration whose predicted peak (weights +
gradients + counted state) does not fit the free memory is not launched: its row shows the prediction, marked as
predicted.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time

import torch

from ..int8_weights import DEFAULT_GROUP_SIZE, int8_bytes, is_int8
from ..layerwise import Layerwise
from ..methods import METHODS, create_optimizer, preset_projection
from ..optimizer import optimizer_state_bytes
from ..train.models import PRESETS, build_llama, checkpoint_activations
from ..train.precision import compute_dtype
from ..train.report import markdown_table
from .formula import formula_bytes

GiB = 2**30
#: (label, method, options, layer-wise); "torch-adamw" is torch.optim.AdamW
CONFIGS = [
    ("AdamW", "torch-adamw", {}, False),
    ("8-bit AdamW", "adamw", {"base": "adamw8bit"}, False),
    ("GaLore", "galore", {}, False),
    ("GaLore 8-bit", "galore", {"base": "adamw8bit"}, False),
    ("GaLore 8-bit layer-wise", "galore", {"base": "adamw8bit"}, True),
    ("SubTrack++ 8-bit layer-wise", "subtrack++", {"base": "adamw8bit"}, True),
    ("GrassJump 8-bit layer-wise", "grassjump", {"base": "adamw8bit"}, True),
    ("APOLLO-Mini layer-wise", "apollo-mini", {}, True),
]
SVD_TRACKERS = ("galore", "subtrack++", "grassjump")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(spec: dict) -> dict:
    """The configuration's steps in this fresh process; absolute bytes."""
    from ..train.allocator import return_freed_memory

    return_freed_memory()
    torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    torch.manual_seed(0)
    method, options = spec["method"], dict(spec["options"])
    weights = options.pop("dtype", "float32")  # the run's --dtype: float32, bfloat16 or int8
    dtype = compute_dtype({"dtype": weights}, spec["device"])
    group = DEFAULT_GROUP_SIZE if weights == "int8" else None
    model = build_llama(spec["preset"], spec["vocab"], spec["device"], dtype=dtype, int8_group_size=group)
    if spec.get("checkpointing", True):
        checkpoint_activations(model)
    rows = spec.get("batch", 1)
    x = torch.randint(0, spec["vocab"], (rows, spec["seq_len"]), generator=torch.Generator().manual_seed(1))
    x = x.to(spec["device"])
    if method == "torch-adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    else:
        kw = {} if METHODS[method] is None else {"rank": _rank(spec), "update_proj_gap": 200}
        if method in SVD_TRACKERS:
            options["svd"] = "randomized"
        opt = create_optimizer(method, model, lr=1e-5, **kw, **options)
    layerwise = Layerwise(opt) if spec["layerwise"] else None
    gc.collect()
    built = torch.cuda.memory_allocated() if cuda else _rss()
    grads_held, times = 0, []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        grads_held = max(
            grads_held, sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        )
        if layerwise is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    gc.collect()
    return {
        "built": built,
        "peak": torch.cuda.max_memory_allocated() if cuda else _hwm(),
        "after": torch.cuda.memory_allocated() if cuda else _rss(),
        "weights": sum(p.numel() * p.element_size() for p in model.parameters() if not is_int8(p)) + int8_bytes(model),
        "grads": grads_held,
        "state": optimizer_state_bytes(opt),
        "step_s": times,
    }


def predicted(spec: dict) -> dict:
    """Weights, gradients (none held under layer-wise) and the counted state formula, without running."""
    model = build_llama(spec["preset"], vocab_size=spec["vocab"], device="meta")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if spec["method"] == "torch-adamw":
        state = 2 * weights
    else:
        options = {k: v for k, v in spec["options"].items() if k != "dtype"}
        state = formula_bytes(model, spec["method"], _rank(spec), {"update_proj_gap": 200, **options})
    return {"weights": weights, "grads": 0 if spec["layerwise"] else weights, "state": state}


def _rank(spec: dict) -> int:
    """The run's rank, or the preset's own (APOLLO-Mini: 1)."""
    return preset_projection(spec["method"]).get("rank", spec["rank"]) if spec["method"] in METHODS else spec["rank"]


def free_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


HEADER = [
    "configuration",
    "",
    "weights",
    "gradients held",
    "optimizer state",
    "rest",
    "peak",
    "first step s",
    "last step s",
]


def measure(label: str, spec: dict, timeout: float = 3600) -> dict:
    """``child`` in a fresh interpreter, so that its peak is its own and not one left by an earlier configuration."""
    proc = subprocess.run(
        [sys.executable, "-m", "gradspace.bench.real_memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_row(label: str, spec: dict, timeout: float = 3600) -> list:
    """The configuration's table row: measured, or on CPU predicted when weights + gradients + state would not fit
    the free memory (``free_bytes``, the host's), so that it is never launched."""
    guess = predicted(spec)
    need = sum(guess.values())
    if spec["device"] == "cpu" and need > 0.9 * free_bytes():
        gib = [guess[k] / GiB for k in ("weights", "grads", "state")]
        return [label, "predicted", *gib, "-", f"> {need / GiB:.2f}", "-", "-"]
    res = measure(label, spec, timeout)
    rest = res["peak"] - res["built"] - res["grads"] - res["state"]
    gib = [res[k] / GiB for k in ("weights", "grads", "state")]
    return [label, "measured", *gib, rest / GiB, res["peak"] / GiB, res["step_s"][0], res["step_s"][-1]]


def run(
    preset: str = "1b",
    rank: int | None = None,
    steps: int = 2,
    seq_len: int = 256,
    threads: int = 2,
    device: str = "cpu",
    labels=None,
    vocab: int = 32000,
    timeout: float = 3600,
) -> str:
    """One row per configuration of ``CONFIGS`` (those in ``labels``, default all), ``steps`` training steps of
    batch 1 x ``seq_len`` each."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (the table shows the first and the last), got {steps}")
    rank = rank or PRESETS[preset][0] // 4
    base = {
        "preset": preset,
        "rank": rank,
        "steps": steps,
        "seq_len": seq_len,
        "threads": threads,
        "device": device,
        "vocab": vocab,
    }
    rows = [
        table_row(label, {**base, "method": method, "options": options, "layerwise": layerwise}, timeout)
        for label, method, options, layerwise in CONFIGS
        if not labels or label in labels
    ]
    meter = "peak RSS" if device == "cpu" else "max_memory_allocated"
    return (
        f"Real training steps, LLaMA-{preset} (vocabulary {vocab}), float32, batch 1 x {seq_len}, gradient "
        f"checkpointing, rank {rank}, randomized SVD, {threads} threads, {steps} steps, {meter} in GiB; "
        "rest = peak - RSS after the build - gradients held - state (activations, transients, allocator)\n\n"
        + markdown_table(HEADER, rows)
    )


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """The flags of ``bench memory --real`` (it also reads ``--peak-rank``, ``--device`` and ``--vocab``)."""
    parser.add_argument("--preset", default="1b", help="with --real")
    parser.add_argument("--real-threads", type=int, default=2, help="with --real: threads of each training process")
    parser.add_argument("--only", default=None, help="with --real: comma-separated configuration labels")
    parser.add_argument("--real-steps", type=int, default=2, help="with --real: training steps per configuration")
    parser.add_argument("--real-seq-len", type=int, default=256, help="with --real: tokens of the batch of 1")


def cli(args) -> str:
    """``bench memory --real`` from its parsed flags."""
    only = args.only.split(",") if args.only else None
    return run(
        args.preset,
        args.peak_rank,
        args.real_steps,
        args.real_seq_len,
        args.real_threads,
        args.device,
        only,
        args.vocab,
    )


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
