"""``python -m gradspace.bench gpu``: the prepared GPU check, one run that writes one page (``docs/gpu.md``).

GPU time comes in minutes, now and then, so everything it needs is prepared and tested beforehand:

1. the ``cuda`` tests (``tests/test_cuda.py``: every preset x inner rule in float32 and bfloat16, every tracker,
   the 8-bit rule against bitsandbytes' kernel, ``torch.compile``, DDP/FSDP2 over nccl on two devices);
2. LLaMA-60M training tokens/s in bfloat16, side by side in one process (alternating steps): torch's fused AdamW,
   galore-torch's GaLoreAdamW and gradspace's GaLore, APOLLO, APOLLO-Mini and SubTrack++;
3. ``optimizer.step()`` alone on the LLaMA-1B and LLaMA-7B parameter shapes, looped and batched (``bench step
   --batched``), and the operations of each (``bench step --ops``, counted on the CPU);
4. peak ``torch.cuda.max_memory_allocated`` of real 1B and 7B training steps (``bench memory --real``'s
   configurations) next to ``gradspace plan``'s prediction for the same run.

``--dry-run`` runs all four on the CPU with tiny shapes (the cuda tests with ``GRADSPACE_TEST_DEVICE=cpu``), so
CI proves the script works before a GPU runs it. A part that fails is reported on the page and makes the exit
status 1; the other parts still run. Budget on one H200: about 8 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..train.report import markdown_table
from .timing import machine, race

ROOT = Path(__file__).resolve().parents[3]  # the checkout (tests/ lives there, not in an installed package)
GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """The shapes of each part: the real ones on the GPU, tiny ones for ``--dry-run``."""

    device: str
    dtype: torch.dtype
    train_preset: str
    train_batch: tuple[int, int]  #: rows x tokens of each training step
    train_steps: int
    step_shapes: tuple[tuple[str, int | None, int], ...]  #: (preset, blocks built or None for all, rank)
    step_repeats: int
    memory: tuple[tuple[str, int], ...]  #: (preset, rank) of the real-step rows
    threads: int


GPU = Sizes(
    "cuda", torch.bfloat16, "60m", (8, 256), 10, (("1b", None, 512), ("7b", 4, 1024)), 3, (("1b", 512), ("7b", 1024)), 8
)
DRY = Sizes("cpu", torch.float32, "tiny", (2, 32), 2, (("tiny", None, 16),), 1, (("tiny", 16),), 1)

#: the training contenders: label -> gradspace method (None: a reference optimizer)
TRAINERS = {
    "torch AdamW (fused)": None,
    "galore-torch GaLoreAdamW": None,
    "gradspace galore": "galore",
    "gradspace galore, batched": "galore",
    "gradspace apollo": "apollo",
    "gradspace apollo-mini": "apollo-mini",
    "gradspace subtrack++": "subtrack++",
}
#: the real-step memory rows: (label, method, options), all layer-wise with bfloat16 weights
MEMORY_CONFIGS = (
    ("GaLore 8-bit layer-wise", "galore", {"base": "adamw8bit", "dtype": "bfloat16"}),
    ("APOLLO-Mini layer-wise", "apollo-mini", {"dtype": "bfloat16"}),
)


# ------------------------------------------------------------------------------------------------------ parts
def cuda_tests(sizes: Sizes) -> str:
    """``pytest tests/test_cuda.py`` in a child process (on the CPU for the dry run); its summary line."""
    path = ROOT / "tests" / "test_cuda.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the GPU check from a checkout of gradspace")
    env = {**os.environ, "GRADSPACE_TEST_DEVICE": sizes.device}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr[-500:]
    skipped = sorted({line.split(": ", 1)[-1] for line in lines if line.startswith("SKIPPED")})
    text = f"`{' '.join(cmd[1:4])} tests/test_cuda.py` with GRADSPACE_TEST_DEVICE={sizes.device}: **{summary}**"
    if skipped:
        text += "\n\nSkipped: " + "; ".join(skipped)
    if done.returncode != 0:
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        raise AssertionError(text + "\n\n" + "\n".join(failures[:40]))
    return text


def training_speed(sizes: Sizes) -> str:
    """Tokens/s of whole training steps (forward, backward, step), each contender with its own copy of the same
    model, alternating step by step (``race``), medians."""
    from ..methods import create_optimizer
    from ..train.models import build_llama
    from .step import _galore_torch

    rows, tokens = sizes.train_batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 32000, (rows, tokens), generator=gen).to(sizes.device)
    steps = {}
    for label, method in TRAINERS.items():
        torch.manual_seed(0)
        model = build_llama(sizes.train_preset, 32000, sizes.device, dtype=sizes.dtype)
        rank = max(1, model.config.hidden_size // 4)
        if label.startswith("torch"):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        elif label.startswith("galore-torch"):
            try:
                opt = _galore_torch(model, rank, 200, 1e-4)
            except ImportError:
                continue  # galore-torch is a test dependency
        else:
            batched = label.endswith("batched")
            opt = create_optimizer(method, model, lr=1e-4, rank=rank, update_proj_gap=200, batched=batched)
        steps[label] = _train_step(model, opt, x)
    times = race(steps, repeats=sizes.train_steps, device=sizes.device, warmup=2)
    fused = times.get("torch AdamW (fused)")
    table = [[k, rows * tokens / t, t * 1e3, t / fused if fused else "-"] for k, t in times.items()]
    title = (
        f"Training steps of LLaMA-{sizes.train_preset} (vocabulary 32000, {sizes.dtype}, batch {rows} x {tokens}, "
        f"rank hidden/4, APOLLO-Mini rank 1) on {sizes.device}, median of {sizes.train_steps} alternating steps "
        "after 2 warm-up steps (the first builds the subspaces)"
    )
    return f"{title}\n\n" + markdown_table(["optimizer", "tokens/s", "step ms", "x fused AdamW"], table)


def _train_step(model, opt, x):
    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def step_shapes(sizes: Sizes) -> str:
    """``bench step --batched`` at each of ``sizes.step_shapes``: the optimizer step alone, each preset looped over
    its weights and batched (``batched=True``), with the operations per step (the proxy for kernel launches)."""
    from . import step

    methods = ["galore", "apollo", "apollo-mini"]  # the batching presets (the training race has SubTrack++)
    tables = []
    for preset, layers, rank in sizes.step_shapes:
        kw = {"device": sizes.device, "dtype": sizes.dtype, "layers": layers}
        tables.append(step.run(preset, methods, rank, repeats=sizes.step_repeats, batched=True, **kw))
        tables.append(step.ops(preset, methods, rank, layers=2))  # counted on the CPU; linear in the depth
    return "\n\n".join(tables)


def memory(sizes: Sizes) -> str:
    """Real training steps in fresh processes (``bench.real_memory``): the measured peak (``max_memory_allocated``
    on CUDA, peak RSS on the CPU) beside ``gradspace plan``'s prediction for the same run."""
    from ..plan.memory import plan_memory
    from ..train.models import build_llama
    from .real_memory import _rank, measure

    meter = "max_memory_allocated" if sizes.device.startswith("cuda") else "peak RSS"
    rows = []
    for preset, rank in sizes.memory:
        for label, method, options in MEMORY_CONFIGS:
            spec = {"preset": preset, "rank": rank, "steps": 2, "seq_len": 256, "threads": sizes.threads}
            spec.update(device=sizes.device, vocab=32000, method=method, options=options, layerwise=True)
            meta = build_llama(preset, vocab_size=32000, device="meta")
            plan = plan_memory(
                meta,
                method=method,
                base=options.get("base", "adamw"),
                dtype=options["dtype"],
                rank=_rank(spec),
                layerwise=True,
                grad_checkpointing=True,
                seq_len=256,
                svd="randomized",
                device=sizes.device,
            )
            got = measure(f"{preset} {label}", spec)
            peak = got["peak"]
            steps = ", ".join(f"{s:.2f}" for s in got["step_s"])
            name = f"LLaMA-{preset} {label}, rank {_rank(spec)}"
            rows.append([name, peak / GiB, plan.peak / GiB, plan.peak / peak, steps])
    title = (
        f"Real training steps (bfloat16 weights, batch 1 x 256, gradient checkpointing, randomized SVD, 2 steps) on "
        f"{sizes.device}: {meter} next to `gradspace plan`"
    )
    header = ["run", f"measured {meter} GiB", "planned GiB", "planned / measured", "step s"]
    return f"{title}\n\n" + markdown_table(header, rows)


PARTS = (
    ("The cuda tests", cuda_tests),
    ("Training speed", training_speed),
    ("The optimizer step at the 1B and 7B shapes", step_shapes),
    ("Peak memory of real steps against the planner", memory),
)


def run(dry_run: bool = False, out: Path | None = None, parts: tuple[str, ...] = ()) -> str:
    """The page, also written to ``out``; each section goes to stderr as it finishes (a run cut short keeps what
    it measured). A failed part is SystemExit once the page is written."""
    sizes = DRY if dry_run else GPU
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("bench gpu: no CUDA device here; --dry-run checks the script on the CPU")
    torch.manual_seed(0)
    start = time.perf_counter()
    what = "dry run on the CPU (tiny shapes, the cuda tests on the CPU)" if dry_run else "the GPU check"
    sections, ok = [f"# gradspace on the GPU: {what}\n\n`python -m gradspace.bench gpu`; {machine()}."], True
    for i, (title, part) in enumerate(PARTS, 1):
        if parts and str(i) not in parts:
            continue
        t0 = time.perf_counter()
        try:
            body = part(sizes)
        except Exception as err:  # one broken part must not cost the others' figures
            body, ok = f"**failed**: {type(err).__name__}: {err}", False
        sections.append(f"## {i}. {title} ({time.perf_counter() - t0:.0f} s)\n\n{body}")
        print(sections[-1] + "\n", file=sys.stderr, flush=True)
    sections.append(f"Total {time.perf_counter() - start:.0f} s.")
    page = "\n\n".join(sections) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page)
    if not ok:
        raise SystemExit(f"bench gpu: a part failed (its section says how){f'; page in {out}' if out else ''}")
    return page


def register(subparsers) -> None:
    gpu = subparsers.add_parser("gpu", help="the prepared GPU check: cuda tests, speed and memory, one page")
    gpu.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes: proves the script works")
    gpu.add_argument("--out", type=Path, default=None, help="the page (default docs/gpu.md; dry run: not written)")
    gpu.add_argument("--parts", default="", help="comma-separated part numbers to run (default all: 1,2,3,4)")
    gpu.set_defaults(main=cli)


def cli(args) -> str:
    out = args.out if args.out is not None else (None if args.dry_run else ROOT / "docs" / "gpu.md")
    return run(args.dry_run, out, tuple(p for p in args.parts.split(",") if p))
