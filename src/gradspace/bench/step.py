"""Time of ``optimizer.step()`` on a whole LLaMA parameter set: torch AdamW (foreach), galore-torch's GaLoreAdamW
and every gradspace preset, measured alternating in one process (medians), with fixed random gradients.

A "non-update" step is one where no subspace update is due; an "update" step is forced (the tracker is told the
update is due). The amortised time over a gap T is ``((T - 1) * non_update + update) / T``.
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import torch

from ..methods import METHODS, create_optimizer, preset_projection
from ..trackers import TRACKERS
from ..train.models import build_llama
from ..train.report import markdown_table
from .timing import race

PAPER_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}


def _params(preset: str, device: str, dtype: torch.dtype, layers: int | None = None):
    torch.manual_seed(0)
    depth = {"num_hidden_layers": layers} if layers else {}
    model = build_llama(preset, vocab_size=32000, **depth).to(device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
    return model


def _galore_torch(model, rank, gap, lr):
    import galore_torch

    proj = [p for n, p in model.named_parameters() if ("attn" in n or "mlp" in n) and p.dim() == 2]
    ids = {id(p) for p in proj}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in ids]},
        {"params": proj, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW(groups, lr=lr)


def _force_galore_torch_update(opt, gap):
    for group in opt.param_groups:
        if "rank" in group:
            for p in group["params"]:
                opt.state[p]["step"] = gap * (opt.state[p]["step"] // gap + 1)


def run(
    preset="60m",
    methods=None,
    rank=None,
    gaps=(200, 50),
    repeats=5,
    device="cpu",
    dtype=torch.float32,
    layers: int | None = None,
    references: bool = True,
    batched: bool = False,
) -> str:
    """``layers`` builds the preset's shapes with fewer blocks (the 1B's full depth does not fit a CPU run's time);
    ``references=False`` leaves out torch AdamW and galore-torch; ``batched`` adds each preset with
    ``batched=True`` beside its loop."""
    rank = rank or PAPER_RANKS.get(preset, 128)
    gap = 10**9  # never due on its own: update steps are forced
    lr = 1e-6  # tiny steps: the weights barely move while they are timed
    model = _params(preset, device, dtype, layers)
    opts = {}
    if references:
        opts["torch.optim.AdamW (foreach)"] = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
        with contextlib.suppress(ImportError):  # galore-torch is a test dependency, not a runtime one
            opts["galore-torch GaLoreAdamW"] = _galore_torch(model, rank, gap, lr)
    for name in methods or [m for m in METHODS if m != "adamw"]:
        own = preset_projection(name).get("rank")  # APOLLO-Mini runs at its own rank 1
        label = f"gradspace {name}" + (f" (rank {own})" if own else "")
        opts[label] = create_optimizer(name, model, lr=lr, rank=own or rank, update_proj_gap=gap)
        if batched:
            opts[f"{label}, batched"] = create_optimizer(
                name, model, lr=lr, rank=own or rank, update_proj_gap=gap, batched=True
            )
    for opt in opts.values():
        opt.step()  # initial bases and state
    non_update = race({k: o.step for k, o in opts.items()}, repeats=repeats, device=device)

    def forced(name, opt):
        if name.startswith("galore-torch"):
            return lambda: (_force_galore_torch_update(opt, gap), opt.step())
        if name.startswith("torch"):
            return opt.step

        def step():
            with _ForceDue():
                opt.step()

        return step

    update = race({k: forced(k, o) for k, o in opts.items()}, repeats=max(1, repeats // 2), device=device, warmup=0)
    ref = non_update.get("galore-torch GaLoreAdamW")
    adam = non_update.get("torch.optim.AdamW (foreach)")
    header = ["optimizer", "non-update step ms", "x AdamW", "x galore-torch", "update step ms"]
    rows, amort_rows = [], []
    for k in opts:
        rows.append(
            [
                k,
                non_update[k] * 1e3,
                non_update[k] / adam if adam else "-",
                non_update[k] / ref if ref else "-",
                update[k] * 1e3,
            ]
        )
        amort = [((t - 1) * non_update[k] + update[k]) / t for t in gaps]
        amort_rows.append([k, *[a * 1e3 for a in amort]])
    ref_amort = {r[0]: r[1:] for r in amort_rows}.get("gradspace galore")
    if ref_amort:
        amort_rows = [r + [r[1 + i] / ref_amort[i] for i in range(len(gaps))] for r in amort_rows]
    depth = f" with {layers} of its blocks" if layers else ""
    title = (
        f"optimizer.step() on the LLaMA-{preset} parameter set{depth}, rank {rank}, {dtype} on {device} "
        f"(median of {repeats})"
    )
    amort_header = ["optimizer", *[f"amortised T={t} ms" for t in gaps], *[f"x gradspace galore (T={t})" for t in gaps]]
    return (
        f"{title}\n\n{markdown_table(header, rows)}\n\n"
        f"Amortised over T steps\n\n{markdown_table(amort_header, amort_rows)}"
    )


#: operations that make views or no-op casts: metadata, no kernel launched
_VIEWS = "transpose t select unbind view as_strided to alias expand detach reshape slice numpy_T lift_fresh mT"
VIEW_OPS = frozenset(f"aten::{n}" for n in _VIEWS.split())


def operations(fn) -> int:
    """torch.profiler's outermost aten operations of ``fn()`` that are not views (an operation's own sub-operations
    are not counted): on CPU the proxy for the kernel launches the same call makes on a GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS]
    return sum(1 for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def ops(preset="60m", methods=None, rank=None, layers: int | None = None) -> str:
    """Operations of one non-update ``optimizer.step()`` (``operations``), the loop against ``batched=True``, for
    each preset on the preset's parameter set: what kernel launches per step scale with."""
    import logging

    logging.getLogger("gradspace").setLevel(logging.ERROR)
    rank = rank or PAPER_RANKS.get(preset, 128)
    model = _params(preset, "cpu", torch.float32, layers)
    weights = sum(1 for p in model.parameters() if p.dim() == 2)
    rows = []
    for name in methods or [m for m in METHODS if m != "adamw"]:
        own = preset_projection(name).get("rank")
        tracker = (METHODS[name] or {}).get("tracker", "svd")
        fast = {"svd": "randomized"} if "svd" in TRACKERS[tracker].defaults else {}  # the bases only: not counted
        counts = []
        for batched in (False, True):
            kw = {"rank": own or rank, "update_proj_gap": 10**9, "batched": batched, **fast}
            opt = create_optimizer(name, model, lr=1e-6, **kw)
            opt.step()  # the bases
            counts.append(operations(opt.step))
            del opt
        rows.append([f"gradspace {name}", counts[0], counts[1], counts[0] / counts[1]])
    depth = f" with {layers} of its blocks" if layers else ""
    title = (
        f"Operations per non-update optimizer.step() on the LLaMA-{preset} parameter set{depth} ({weights} 2-D "
        "weights), rank {rank}: torch.profiler's outermost aten operations, views left out"
    ).replace("{rank}", str(rank))
    return f"{title}\n\n" + markdown_table(["optimizer", "loop", "batched", "loop / batched"], rows)


def floor(preset="60m", rank=None, repeats: int = 7, layers: int | None = None, diagnostics: bool = True) -> str:
    """GaLore's non-update step against its floor, timed alternating: the floor is the step's own arithmetic
    written out by hand on the optimizer's shapes (per projected weight ``S^T G``, Adam on the r x l projection,
    ``p.addmm_(S, D)``; PyTorch's fused Adam over the full-rank weights), without a finiteness check,
    diagnostics or the loop's bookkeeping; the ratio is what gradspace's frame costs on top of it."""
    from ..projection import oriented

    rank = rank or PAPER_RANKS.get(preset, 128)
    model = _params(preset, "cpu", torch.float32, layers)
    opts = {
        "gradspace galore": create_optimizer("galore", model, lr=1e-6, rank=rank, update_proj_gap=10**9),
        "gradspace galore, batched": create_optimizer(
            "galore", model, lr=1e-6, rank=rank, update_proj_gap=10**9, batched=True
        ),
    }
    for opt in opts.values():
        opt.collect_diagnostics = diagnostics
        opt.step()  # the bases
    ref = opts["gradspace galore"]
    projected, full = [], []
    for group in ref.param_groups:
        for p in group["params"]:
            layout = ref.layout(p, group)
            if layout is None:
                full.append(p)
                continue
            st = ref.state[p]
            m, v = (st["rule"][k].clone() for k in ("exp_avg", "exp_avg_sq"))
            projected.append((p, layout[0], st["basis"].clone(), m, v))
    m_full = [torch.zeros_like(p) for p in full]
    v_full = [torch.zeros_like(p) for p in full]
    steps = [torch.tensor(1.0)] * len(full)

    @torch.no_grad()
    def by_hand():
        for p, right, basis, m, v in projected:
            gt = basis.mT @ oriented(p.grad, right)
            m.mul_(0.9).add_(gt, alpha=0.1)
            v.mul_(0.999).addcmul_(gt, gt, value=0.001)
            d = m / v.sqrt().add_(1e-6)
            if right:
                p.addmm_(d.mT, basis.mT, alpha=-1e-6)
            else:
                p.addmm_(basis, d, alpha=-1e-6)
        torch._fused_adam_(full, [p.grad for p in full], m_full, v_full, [], steps, lr=1e-6, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=1e-6, amsgrad=False, maximize=False)  # fmt: skip

    times = race({"floor (by hand)": by_hand, **{k: o.step for k, o in opts.items()}}, repeats=repeats)
    base = times["floor (by hand)"]
    rows = [[k, t * 1e3, t / base] for k, t in times.items()]
    depth = f" with {layers} of its blocks" if layers else ""
    what = "diagnostics on (the default)" if diagnostics else "diagnostics off"
    title = (
        f"GaLore's non-update optimizer.step() against its floor, LLaMA-{preset} parameter set{depth}, rank {rank}, "
        f"float32 on cpu, {what}, {torch.get_num_threads()} thread(s) (median of {repeats}, alternating)"
    )
    return f"{title}\n\n" + markdown_table(["step", "ms", "x floor"], rows)


class _ForceDue:
    """Make every tracker report that an update is due (to time an update step)."""

    def __enter__(self):
        self._patches = [mock.patch.object(type(t), "due", lambda *a, **k: True) for t in TRACKERS.values()]
        for p in self._patches:
            p.start()

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()


def stagger(preset: str = "1b", rank: int | None = None, layers: int | None = 2, device: str = "cpu") -> str:
    """The largest single step with ``update_stagger`` and the randomized SVD, against the unstaggered exact one.

    With N projected weights and a gap T >= N, staggering puts at most one subspace update on any step; the run
    here uses T = N, so that *every* step carries one update: the worst step of any T >= N. Its steps are timed
    one by one next to the same optimizer's non-update step; GaLore-exact's forced update step (every weight's SVD
    at once) is the unstaggered worst case."""
    import statistics
    import time

    rank = rank or PAPER_RANKS.get(preset, 128)
    model = _params(preset, device, torch.float32, layers)
    quiet = create_optimizer("galore", model, lr=1e-6, rank=rank, update_proj_gap=10**9)
    n = sum(len(g["params"]) for g in quiet.param_groups if "rank" in g)
    spread = create_optimizer(
        "galore", model, lr=1e-6, rank=rank, update_proj_gap=n, update_stagger=True, svd="randomized"
    )
    for opt in (quiet, spread):
        opt.step()  # first bases
    base = race({"non-update": quiet.step}, repeats=3, device=device)["non-update"]

    def forced():
        with _ForceDue():
            quiet.step()

    exact_update = race({"update": forced}, repeats=1, device=device, warmup=0)["update"]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        spread.step()
        times.append(time.perf_counter() - t0)
    rows = [
        ["galore, exact SVD, all updates on one step (forced)", base * 1e3, exact_update * 1e3, exact_update / base],
        [
            f"galore, randomized SVD, update_stagger (T = N = {n}: one update on every step)",
            base * 1e3,
            max(times) * 1e3,
            max(times) / base,
        ],
    ]
    depth = f" with {layers} of its blocks" if layers else ""
    return (
        f"Largest single optimizer step, LLaMA-{preset} parameter set{depth}, rank {rank}, {device}; staggered steps "
        f"median {statistics.median(times) * 1e3:.0f} ms\n\n"
        + markdown_table(["optimizer", "non-update step ms", "largest step ms", "largest / non-update"], rows)
    )


def register(subparsers) -> None:
    """``bench step``: ``run``, or ``stagger`` with ``--stagger``."""
    stp = subparsers.add_parser("step", help="optimizer.step() time on a LLaMA parameter set vs AdamW and galore-torch")
    stp.add_argument("--preset", default="60m")
    stp.add_argument("--rank", type=int, default=None, help="default: the papers' rank for the preset")
    stp.add_argument("--methods", default=None, help="comma-separated gradspace presets (default: all)")
    stp.add_argument("--repeats", type=int, default=5)
    stp.add_argument("--device", default="cpu")
    stp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    stp.add_argument("--layers", type=int, default=None, help="build the preset with this many blocks")
    stp.add_argument("--no-references", action="store_true", help="leave out torch AdamW and galore-torch")
    stp.add_argument(
        "--stagger", action="store_true", help="instead: the largest single step with update_stagger + randomized SVD"
    )
    stp.add_argument("--batched", action="store_true", help="add each preset with batched=True beside its loop")
    stp.add_argument("--ops", action="store_true", help="instead: operations per step, loop vs batched (profiler)")
    stp.add_argument("--floor", action="store_true", help="instead: GaLore's step against its hand-written floor")
    stp.add_argument("--no-diagnostics", action="store_true", help="with --floor: the optimizers without energy")
    stp.set_defaults(main=cli)


def cli(args) -> str:
    """``bench step`` from its parsed flags."""
    if args.stagger:
        return stagger(args.preset, args.rank, args.layers, args.device)
    methods = args.methods.split(",") if args.methods else None
    if args.ops:
        return ops(args.preset, methods, args.rank, args.layers)
    if args.floor:
        return floor(args.preset, args.rank, args.repeats, args.layers, diagnostics=not args.no_diagnostics)
    return run(
        args.preset,
        methods,
        args.rank,
        repeats=args.repeats,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        layers=args.layers,
        references=not args.no_references,
        batched=args.batched,
    )
