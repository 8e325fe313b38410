"""AdaRankGrad on a small LLaMA over Shakespeare's characters.

``run``: sweep of the refresh criterion (``varsigma``, ``min_gap``): final loss, refreshes per weight and mean
effective rank, to justify the defaults. ``run_variants``: the rank rule (``criterion``, ``basis``, ``r_min``,
``eta_th``) against GaLore over several seeds: held-out loss, its paired difference to GaLore, mean rank and
optimizer state.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ..basis_storage import basis_shape
from ..methods import create_optimizer
from ..optimizer import optimizer_state_bytes
from ..train.assets import shakespeare_text
from ..train.report import markdown_table


def _setup(steps: int, seed: int = 0, split: bool = False, n_held_out: int = 20):
    """Model builder, training batches and held-out batches (16 windows of 64 characters each).

    ``split``: held-out windows come from the last 10% of the text, training windows from the rest (the
    refresh sweep's original setup, ``split=False``, draws both from the whole text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = shakespeare_text()[:400_000]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text])
    gen = torch.Generator().manual_seed(seed)

    def windows(src, n):
        starts = torch.randint(0, len(src) - 65, (n, 16), generator=gen)
        return [torch.stack([src[s : s + 64] for s in row]) for row in starts]

    if split:
        cut = len(ids) * 9 // 10
        train, held_out = windows(ids[:cut], steps), windows(ids[cut:], n_held_out)
    else:
        both = windows(ids, steps + n_held_out)
        train, held_out = both[:steps], both[steps:]
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )

    def model():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)

    return model, train, held_out


def _train(build, train, held_out, method: str, opts: dict, rank: int, gap: int, seed: int = 0) -> dict:
    """Train one variant; held-out loss, refreshes per weight, final and time-averaged rank and state bytes."""
    model = build()
    opts = dict(opts)
    rank = opts.pop("rank", rank)
    opt = create_optimizer(method, model, lr=3e-3, rank=rank, update_proj_gap=gap, seed=seed, **opts)
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    ranks, state = [], []
    t0 = time.perf_counter()
    for x in train:
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        ranks.append(sum(basis_shape(opt.state[p])[1] for p in projected) / len(projected))
        state.append(optimizer_state_bytes(opt))
    with torch.no_grad():
        val = sum(model(input_ids=x, labels=x).loss.item() for x in held_out) / len(held_out)
    weights = opt.diagnostics()["weights"].values()
    return {
        "loss": val,
        "refreshes": sum(w["updates"] for w in weights) / len(weights),
        "final_rank": sum(w["rank"] for w in weights) / len(weights),
        "mean_rank": sum(ranks) / len(ranks),
        "final_state": opt.diagnostics()["state_bytes"],
        "mean_state": sum(state) / len(state),
        "peak_state": max(state),
        "seconds": time.perf_counter() - t0,
    }


def run(steps: int = 300, gap: int = 50, rank: int = 16) -> str:
    build, train, held_out = _setup(steps)
    variants = [("galore (reference)", "galore", {})]
    for varsigma in (0.3, 0.5, 0.7):
        for min_gap in (gap // 4, gap // 2):
            variants.append(
                (
                    f"adarank varsigma={varsigma} min_gap={min_gap}",
                    "adarank",
                    {"varsigma": varsigma, "min_gap": min_gap},
                )
            )
    rows = []
    for label, method, opts in variants:
        r = _train(build, train, held_out, method, opts, rank, gap)
        rows.append([label, r["loss"], r["refreshes"], r["final_rank"], r["final_state"]])
    title = (
        f"AdaRankGrad refresh criterion, LLaMA hidden 64 x 2 layers, Shakespeare characters, {steps} steps, "
        f"batch 16 x 64, rank/r_max {rank}, max_gap {gap}, eta_th 0.48"
    )
    return f"{title}\n\n" + markdown_table(
        ["variant", "held-out loss", "refreshes per weight", "mean rank", "optimizer state B"], rows
    )


def rank_variants(rank: int) -> list[tuple[str, str, dict]]:
    """GaLore (the reference first) and the AdaRankGrad rank rules compared by ``run_variants``: (label, method,
    options); a ``rank`` option overrides the run's rank (GaLore at AdaRankGrad's smaller ranks)."""
    q, h, tq = max(1, rank // 4), max(1, rank // 2), max(1, 3 * rank // 4)
    ada = [
        ("paper default (squared, ordered, r_min 1, eta_th 0.48)", {}),
        ("unsquared", {"criterion": "unsquared"}),
        ("prefix basis", {"basis": "prefix"}),
        ("prefix basis, power_iters 0 (Algorithm 1 exactly)", {"basis": "prefix", "power_iters": 0}),
        (f"r_min {q}", {"r_min": q}),
        (f"r_min {h}", {"r_min": h}),
        ("eta_th 0.1", {"eta_th": 0.1}),
        ("eta_th 0.05", {"eta_th": 0.05}),
        ("eta_th 0.02", {"eta_th": 0.02}),
        ("unsquared, eta_th 0.1 (= squared 0.01)", {"criterion": "unsquared", "eta_th": 0.1}),
        (f"r_min {q}, eta_th 0.05", {"r_min": q, "eta_th": 0.05}),
        (f"r_min {h}, eta_th 0.1", {"r_min": h, "eta_th": 0.1}),
    ]
    return (
        [("galore (reference)", "galore", {})]
        + [(f"galore rank {r}", "galore", {"rank": r}) for r in (h, tq)]
        + [(f"adarank {label}", "adarank", o) for label, o in ada]
    )


def _pm(xs: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{digits}f} ± {sd:.{digits}f}"


def run_variants(steps: int = 300, seeds: int = 3, gap: int = 50, rank: int = 16, only: str | None = None) -> str:
    """Every variant of ``rank_variants`` on the same data, steps and lr, for each seed (seed = data draw, model
    init and the tracker's random draws); mean ± std over seeds. ``only``: comma-separated substrings of labels
    (the GaLore reference always runs)."""
    variants = rank_variants(rank)
    if only:
        keys = [k.strip() for k in only.split(",")]
        variants = variants[:1] + [v for v in variants[1:] if any(k in v[0] for k in keys)]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    t_all = time.perf_counter()
    for seed in range(seeds):
        build, train, held_out = _setup(steps, seed, split=True, n_held_out=40)
        for label, method, opts in variants:
            r = _train(build, train, held_out, method, opts, rank, gap, seed)
            results[label].append(r)
            print(
                f"seed {seed} | {label} | loss {r['loss']:.4f} | mean rank {r['mean_rank']:.2f} | {r['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print(f"{time.perf_counter() - t_all:.0f} s in all", file=sys.stderr, flush=True)
    ref = results[variants[0][0]]
    rows = []
    for label, _, _ in variants:
        rs = results[label]
        diff = [r["loss"] - g["loss"] for r, g in zip(rs, ref)]
        mean, peak = (statistics.fmean(r[k] for r in rs) for k in ("mean_state", "peak_state"))
        rows.append(
            [
                label,
                _pm([r["loss"] for r in rs]),
                _pm(diff),
                _pm([r["mean_rank"] for r in rs], 2),
                _pm([r["final_rank"] for r in rs], 2),
                statistics.fmean(r["refreshes"] for r in rs),
                round(mean),
                round(peak),
                mean / statistics.fmean(g["mean_state"] for g in ref),
                peak / statistics.fmean(g["peak_state"] for g in ref),
            ]
        )
    title = (
        f"AdaRankGrad rank rules vs GaLore, LLaMA hidden 64 x 2 layers, Shakespeare characters (held-out: last "
        f"10% of the text), {steps} steps, batch 16 x 64, lr 3e-3, rank/r_max {rank}, max_gap {gap}, "
        f"{seeds} seeds (mean ± std)"
    )
    return f"{title}\n\n" + markdown_table(
        [
            "variant",
            "held-out loss",
            "minus galore (paired)",
            "mean rank (steps x weights)",
            "final rank",
            "refreshes per weight",
            "state B, mean over steps",
            "state B, peak",
            "mean x galore",
            "peak x galore",
        ],
        rows,
    )


def register(subparsers) -> None:
    """``bench adarank``: ``run``, or ``run_variants`` with ``--variants``."""
    ada = subparsers.add_parser(
        "adarank", help="AdaRankGrad: refresh-criterion sweep, or --variants: rank rules vs GaLore"
    )
    ada.add_argument("--steps", type=int, default=300)
    ada.add_argument(
        "--variants",
        action="store_true",
        help="instead: rank rules (criterion, basis, r_min, eta_th) vs GaLore over several seeds",
    )
    ada.add_argument("--seeds", type=int, default=3, help="with --variants")
    ada.add_argument("--only", default=None, help="with --variants: comma-separated label substrings")
    ada.set_defaults(main=cli)


def cli(args) -> str:
    """``bench adarank`` from its parsed flags."""
    if args.variants:
        return run_variants(args.steps, args.seeds, only=args.only)
    return run(args.steps)
