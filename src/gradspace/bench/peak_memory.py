"""Peak memory of a whole training step, with and without layer-wise mode: each configuration in a fresh
subprocess (``python -m gradspace.bench.peak_memory SPEC``), so one configuration's allocations cannot hide in
another's. On CPU the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its RSS after the
model was built, with glibc's mmap threshold fixed so that freed tensors go back to the OS; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation after the build."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..basis_storage import basis_shape
from ..layerwise import Layerwise
from ..methods import METHODS, create_optimizer
from ..optimizer import optimizer_state_bytes
from ..train.models import build_llama
from ..train.report import markdown_table
from .formula import MiB, formula_bytes, projected_grad_bytes, variants


# ---------------------------------------------------------------------------------------------- peak memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class _Meter:
    """Peak memory since ``reset``, minus ``baseline``: RSS on CPU, the caching allocator's count on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def current(self) -> int:
        gc.collect()
        return torch.cuda.memory_allocated() if self.cuda else _status_kb("VmRSS") * 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS (Linux >= 4.0)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _status_kb("VmHWM") * 1024


def peak_child(spec: dict) -> dict:
    """One configuration's training steps in this (fresh) process; returns bytes relative to after the build."""
    torch.set_num_threads(1)
    device = spec["device"]
    torch.manual_seed(0)
    model = build_llama(spec["preset"], vocab_size=spec["vocab"], **spec.get("overrides", {})).to(device)
    x = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq_len"]), generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    method, options = spec["method"], spec["options"]
    if method == "torch-adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        kw = {} if METHODS[method] is None else {"rank": spec["rank"], "update_proj_gap": spec["gap"]}
        opt = create_optimizer(method, model, lr=1e-4, **kw, **options)
    layerwise = Layerwise(opt) if spec["layerwise"] else None

    def step():
        model(input_ids=x, labels=x).loss.backward()
        if layerwise is None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    meter = _Meter(device)
    base = meter.current()
    meter.reset()
    t0 = time.perf_counter()
    step()
    first = meter.peak() - base
    first_s = time.perf_counter() - t0
    meter.reset()
    for _ in range(spec["steps"] - 1):
        step()
    steady = meter.peak() - base
    out = {
        "first_peak": first,
        "steady_peak": steady,
        "after": meter.current() - base,
        "state": optimizer_state_bytes(opt),
        "first_step_s": first_s,
        "projected_grads": projected_grad_bytes(model),
        "all_grads": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if method != "torch-adamw":
        names = {p: n for n, p in model.named_parameters()}
        ranks = {names[p]: basis_shape(st)[1] for p, st in opt.state.items() if "basis" in st}
        clocks = {
            names[p]: (st["step"] - st.get("tracker", {}).get("trk_last", 0), st["updates"])
            for p, st in opt.state.items()
            if "basis" in st
        }
        out["formula"] = formula_bytes(
            model, method, spec["rank"], {"update_proj_gap": spec["gap"], **options}, ranks, clocks
        )
    return out


def run_child(spec: dict, timeout: float = 1800) -> dict:
    """Run ``peak_child`` in a fresh interpreter. glibc's mmap threshold is fixed (not raised after each free) so
    that a freed tensor's pages go back to the OS and RSS tracks what is live."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gradspace.bench.peak_memory", json.dumps(spec)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_specs(
    preset: str,
    rank: int,
    steps: int,
    seq_len: int,
    batch: int,
    vocab: int,
    device: str,
    methods=None,
    gap: int = 200,
    overrides=None,
) -> list[tuple[str, dict]]:
    """(label, child spec) for torch's AdamW and each variant (default: all but 8-bit), normal and layer-wise."""
    methods = methods or ["torch.optim.AdamW", *[v[0] for v in variants() if "8-bit" not in v[0]]]
    base = {
        "preset": preset,
        "rank": rank,
        "steps": steps,
        "seq_len": seq_len,
        "batch": batch,
        "vocab": vocab,
        "device": device,
        "gap": gap,
        "overrides": overrides or {},
    }
    specs = []
    if "torch.optim.AdamW" in methods:
        specs.append(("torch.optim.AdamW", {**base, "method": "torch-adamw", "options": {}, "layerwise": False}))
    chosen = [v for v in variants() if v[0] in methods]
    for label, method, options in chosen:
        for lw in (False, True):
            specs.append((label, {**base, "method": method, "options": options, "layerwise": lw}))
    return specs


def peak_table(
    specs: list[tuple[str, dict]], runner: Callable[[dict], dict] = run_child, jobs: int = 1
) -> tuple[list, str]:
    """Run every configuration (``jobs`` subprocesses at a time: each measures only its own memory)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        measured = list(pool.map(runner, [spec for _, spec in specs]))
    results = []
    for (label, spec), res in zip(specs, measured):
        if "formula" in res and res["formula"] != res["state"]:
            raise AssertionError(f"{label}: counted {res['state']} != formula {res['formula']} bytes")
        results.append((label, spec, res))
    rows = []
    for label, spec, res in results:
        saving, met = "", ""
        if spec["layerwise"]:
            normal = next(r for lab, s, r in results if lab == label and not s["layerwise"])
            saving = (normal["steady_peak"] - res["steady_peak"]) / MiB
            met = "met" if saving * MiB >= res["projected_grads"] else "no"
        rows.append(
            [
                label,
                "layer-wise" if spec["layerwise"] else "normal",
                res["state"] / MiB,
                res["first_peak"] / MiB,
                res["steady_peak"] / MiB,
                saving,
                met,
            ]
        )
    spec0, res0 = specs[0][1], results[0][2]
    meter = "peak RSS - RSS after build" if spec0["device"] == "cpu" else "max_memory_allocated - after build"
    title = (
        f"Peak memory of a training step (forward + backward + optimizer step), LLaMA-{spec0['preset']} "
        f"{spec0.get('overrides') or ''}vocabulary {spec0['vocab']}, batch {spec0['batch']} x {spec0['seq_len']}, "
        f"rank {spec0['rank']}, float32 on {spec0['device']}, {meter}, MiB; steady = steps 2-{spec0['steps']}. "
        f"Gradients of the projected weights: {res0['projected_grads'] / MiB:.1f} MiB; of all parameters: "
        f"{res0['all_grads'] / MiB:.1f} MiB"
    )
    return results, f"{title}\n\n" + markdown_table(
        [
            "method",
            "mode",
            "state MiB",
            "first step peak MiB",
            "steady step peak MiB",
            "layer-wise saving MiB",
            "saving >= projected grads",
        ],
        rows,
    )


if __name__ == "__main__":  # the subprocess of run_child
    print(json.dumps(peak_child(json.loads(sys.argv[1]))))
