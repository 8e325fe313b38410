"""The ``gradspace compare`` report: a markdown table, matplotlib plots (Agg) and the raw metrics as JSON."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .atomic import save_figure, write_atomic

COLUMNS = (
    "method",
    "lr",
    "val loss",
    "vs adamw",
    "val ppl",
    "wall time s",
    "subspace update s",
    "x galore",
    "optimizer state B",
    "x adamw",
    "trainable params",
    "peak memory B",
)
#: one colour per method in every plot (tab10, in the order of the presets); other names cycle through the rest
COLORS = {
    "adamw": "tab:gray",
    "galore": "tab:blue",
    "fira": "tab:cyan",
    "subtrack": "tab:orange",
    "subtrack++": "tab:red",
    "osd": "tab:green",
    "osd-code": "tab:olive",
    "adarank": "tab:purple",
    "grasswalk": "tab:brown",
    "grassjump": "tab:pink",
    "apollo": "#1f3b73",
    "apollo-mini": "#7f6000",
    "adamw8bit": "#555555",
    "lora": "#e6ab02",
    "dora": "#a6761d",
    "relora": "#66a61e",
    "lowrank": "#000000",
    "badam": "#e7298a",
}
_SPARE = ("#006d5b", "#8b0000", "#4b0082", "#b8860b", "#2f4f4f")


def color(method: str, results: dict[str, Any]) -> str:
    if method in COLORS:
        return COLORS[method]
    others = [m for m in results if m not in COLORS]
    return _SPARE[others.index(method) % len(_SPARE)] if method in others else _SPARE[0]


def columns(results: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """Pretraining shows validation loss and perplexity; fine-tuning its task's metric (a summary's ``metric``)."""
    metric = next((r["metric"] for r in results.values() if r.get("metric")), None)
    return COLUMNS if metric is None else (*COLUMNS[:2], f"val {metric}", "vs adamw", "val loss", *COLUMNS[5:])


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def _mean(r: dict[str, Any], key: str, digits: int = 4) -> str:
    """``2.2460`` for one seed, ``2.2460 ± 0.0450`` for several."""
    value = r.get(key, float("nan"))
    sd = (r.get("spread") or {}).get(key)
    return f"{value:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _label(method: str, r: dict[str, Any]) -> str:
    if r.get("diverged"):
        return method + " (diverged)"
    if r.get("diverged_seeds"):
        return f"{method} (diverged {len(r['diverged_seeds'])}/{len(r['seeds'])})"
    return method


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per method; "vs adamw" is the difference of the headline metric (loss: negative is better), marked
    "(noise)" when it is within the seeds' spread (``spread.NOISE_RULE``); "x galore" the time in subspace updates
    over GaLore's (its SVDs), "x adamw" the state over AdamW's. Several seeds: mean ± standard deviation."""
    from .spread import within_noise

    ref = results.get("adamw")
    svd = (results.get("galore") or {}).get("update_seconds")
    rows = []
    for method, r in results.items():
        key = r["metric"] if r.get("metric") else "val_loss"
        diff = "-"
        if ref and method != "adamw":
            diff = f"{r[key] - ref[key]:+.4f}" + (" (noise)" if within_noise(r, ref, key) else "")
        quality = [_mean(r, key), diff, _mean(r, "val_loss") if r.get("metric") else _mean(r, "val_ppl", 2)]
        lr = r.get("lr")
        rows.append(
            [
                _label(method, r),
                f"{lr:g}" if isinstance(lr, (int, float)) else "-",
                *quality,
                f"{r['wall_time']:.1f}",
                f"{r['update_seconds']:.2f}",
                _ratio(r["update_seconds"], svd) if method != "adamw" else "-",
                f"{r['state_bytes']:,.0f}",
                _ratio(r["state_bytes"], ref and ref["state_bytes"]),
                f"{r['trainable_params']:,}" if isinstance(r.get("trainable_params"), int) else "-",
                f"{r['peak_memory']:,.0f}",
            ]
        )
    return rows


def tuning_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The learning-rate grid: each tuning run's validation loss per method, and the rate chosen."""
    tuned = {m: r["tuning"] for m, r in results.items() if r.get("tuning")}
    rates = sorted({float(lr) for t in tuned.values() for lr in t["val_loss"]})
    header = ["method", *(f"lr {lr:g}" for lr in rates), "chosen"]
    rows = []
    for method, t in tuned.items():
        losses = {float(lr): v for lr, v in t["val_loss"].items()}
        cells = [
            ("-" if lr not in losses else "diverged" if losses[lr] == float("inf") else f"{losses[lr]:.4f}")
            for lr in rates
        ]
        edge = len(losses) > 2 and t["chosen"] in (min(losses), max(losses))
        rows.append([method, *cells, f"{t['chosen']:g}" + (" (edge of the grid)" if edge else "")])
    return header, rows


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """The one markdown table of the project (reports and benchmarks): first column left, the others right;
    floats with 4 significant digits."""

    def fmt(x: object) -> str:  # a "|" in a cell (a method's option value) would split it: escaped
        return (f"{x:.4g}" if isinstance(x, float) else str(x)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [list(columns(results)), *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def _curves(r: dict[str, Any]) -> tuple[tuple[list, list], tuple[list, list, list | None]]:
    """((train steps, losses), (validation steps, means, sds or None)) of one method: its run's curves, or for
    several seeds the mean at the steps every seed has; the training curve smoothed over :func:`window` steps."""
    import statistics

    seeds = list((r.get("curves") or {}).values())
    if not seeds:
        history, evals = r.get("history", []), r.get("evals", [])
        val = [e for e in evals if "val_loss" in e]
        steps = [h["step"] for h in history]
        return (steps, _smoothed(steps, [h["loss"] for h in history])), (
            [e["step"] for e in val],
            [e["val_loss"] for e in val],
            None,
        )
    per_step = [{h["step"]: h["loss"] for h in c["history"]} for c in seeds]
    steps = sorted(set.intersection(*(set(p) for p in per_step)))
    mean = [statistics.fmean(p[t] for p in per_step) for t in steps]
    smooth = _smoothed(steps, mean)
    per_eval = [{e["step"]: e["val_loss"] for e in c["evals"] if "val_loss" in e} for c in seeds]
    at = sorted(set.intersection(*(set(p) for p in per_eval)))
    values = [[p[t] for p in per_eval] for t in at]
    sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return (steps, smooth), (at, [statistics.fmean(v) for v in values], sds)


def window(steps: list[int]) -> int:
    """The smoothing window of the plotted training loss, in steps: 1/50 of the run."""
    return max(1, (steps[-1] - steps[0]) // 50) if steps else 1


def _smoothed(steps: list[int], values: list[float]) -> list[float]:
    """The mean over the last :func:`window` steps at each step: a window in steps, not points, since a resumed
    seed's curve may be logged more sparsely before its checkpoint."""
    import statistics

    span, smooth, first = window(steps), [], 0
    for i, t in enumerate(steps):
        while steps[first] <= t - span:
            first += 1
        smooth.append(statistics.fmean(values[first : i + 1]))
    return smooth


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``L3.q_proj``; ``bert.encoder.layer.3.attention.self.query``
    -> ``L3.query``."""
    name = re.sub(r"^.*?layers?\.(\d+)\.", r"L\1.", name)
    for part, short in (
        (".self_attn.", "."),
        (".mlp.", "."),
        (".attention.self.", "."),
        (".attention.output.", ".attn_out."),
    ):
        name = name.replace(part, short)
    return name.replace(".weight", "")


def write_plots(folder: Path, results: dict[str, dict[str, Any]]) -> list[str]:
    """loss.png, state_bytes.png, energy.png, and rank.png only when some rank differs from the others (a fixed
    rank is a flat line that says nothing)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = ["loss.png"]
    _loss_plot(plt, folder / "loss.png", results)

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(results) + 1.5))
    methods = list(results)[::-1]
    ref = (results.get("adamw") or {}).get("state_bytes")
    values = [results[m]["state_bytes"] / 2**20 for m in methods]
    ax.barh(methods, values, color=[color(m, results) for m in methods])
    for i, m in enumerate(methods):
        label = f" {values[i]:.2f} MiB" + (f" ({results[m]['state_bytes'] / ref:.0%} of AdamW)" if ref else "")
        ax.text(values[i], i, label, va="center", fontsize=8)
    if ref:
        ax.axvline(ref / 2**20, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, max(values) * 1.6)
    ax.set(xlabel="optimizer state (MiB)", title="Optimizer-state memory")
    fig.tight_layout()
    save_figure(fig, folder / "state_bytes.png")
    plt.close(fig)
    written.append("state_bytes.png")

    return written + _per_layer_plots(folder, results)


def _loss_plot(plt, path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Two panels, one colour per method: the whole run (smoothed train loss, validation points), and the last
    30% of the run zoomed to the range its curves span there, where the methods' differences are read: the
    validation loss (with its band over seeds) when the runs evaluate, else the smoothed train loss (every method
    reads the same batches, so the train loss's wiggles are shared and hide the differences)."""
    curves = {m: _curves(r) for m, r in results.items()}
    last = max((t[0][-1] for t, _ in curves.values() if t[0]), default=0)
    start = 0.7 * last
    validated = any(len([x for x in val[0] if x >= start]) >= 1 for _, val in curves.values())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.15]})
    zoomed = []
    for method, (train, val) in curves.items():
        c = color(method, results)
        axes[0].plot(train[0], train[1], linewidth=1.0, color=c, alpha=0.8)
        if val[0]:
            axes[0].plot(val[0], val[1], "o", markersize=3, color=c)
        x, y, band = (val[0], val[1], val[2]) if validated else (train[0], train[1], None)
        style = "o-" if validated else "-"
        axes[1].plot(x, y, style, markersize=4, linewidth=1.4, color=c, label=method)
        if band is not None:
            low, high = [m - sd for m, sd in zip(y, band)], [m + sd for m, sd in zip(y, band)]
            axes[1].fill_between(x, low, high, color=c, alpha=0.15, linewidth=0)
            zoomed += [v for t, v in zip(x, low) if t >= start] + [v for t, v in zip(x, high) if t >= start]
        zoomed += [v for t, v in zip(x, y) if t >= start]
    finite = [v for v in zoomed if math.isfinite(v)]
    if finite and last:
        pad = 0.05 * (max(finite) - min(finite) or 1.0)
        axes[1].set(xlim=(start - 0.02 * last, last * 1.02), ylim=(min(finite) - pad, max(finite) + pad))
    steps = next((t[0] for t, _ in curves.values() if t[0]), [])
    several = any(r.get("curves") for r in results.values())
    ylabel = f"loss (line: train, mean over {window(steps)} steps; dots: validation)"
    axes[0].set(xlabel="step", ylabel=ylabel, title="Loss" + (": mean over seeds" if several else ""))
    what = "validation loss" + (" (band: ± 1 sd over seeds)" if several else "") if validated else "train loss"
    axes[1].set(xlabel="step", title=f"The last 30% of the run: {what}")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _per_layer_plots(folder: Path, results: dict[str, dict[str, Any]]) -> list[str]:
    """energy.png, and rank.png when some rank differs from the others."""
    import matplotlib.pyplot as plt

    written = []
    projected = {m: r["weights"] for m, r in results.items() if r.get("weights")}
    ranks = {w.get("rank") for ws in projected.values() for w in ws.values()}
    for key, label, fname in (("energy", "captured energy", "energy.png"), ("rank", "rank", "rank.png")):
        if not projected or (key == "rank" and len(ranks) <= 1):
            continue
        fig, ax = plt.subplots(figsize=(10, 4.5))
        layers = sorted({w for ws in projected.values() for w in ws})
        width = 0.8 / len(projected)
        for i, (method, ws) in enumerate(projected.items()):
            values = [(ws.get(w) or {}).get(key) for w in layers]
            ax.bar(
                [j + i * width for j in range(len(layers))],
                [v if v is not None else 0 for v in values],
                width,
                label=method,
                color=color(method, results),
            )
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(layers))],
            [_short(w) for w in layers],
            rotation=60,
            ha="right",
            fontsize=7,
        )
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set(ylabel=label, title=f"Per-layer {label} at the end of training")
        fig.tight_layout()
        save_figure(fig, folder / fname)
        plt.close(fig)
        written.append(fname)
    return written


def write_run_plots(folder: Path, summary: dict[str, Any], lines: list[dict[str, Any]]) -> list[str]:
    """A single run's plots in its folder: curves.png (train loss per logging window and validation loss; the
    learning rate), and the per-layer captured energy (and rank, when it varies)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder = Path(folder)
    train = [x for x in lines if x.get("type") == "train"]
    evals = [x for x in lines if x.get("type") == "eval" and "val_loss" in x]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    c = color(summary.get("method", ""), {summary.get("method", ""): summary})
    top.plot([x["step"] for x in train], [x["loss"] for x in train], color=c, linewidth=1, label="train")
    if evals:
        top.plot(
            [x["step"] for x in evals],
            [x["val_loss"] for x in evals],
            "o-",
            color="black",
            markersize=3,
            linewidth=0.8,
            label="validation",
        )
    top.set(ylabel="loss", title=f"{summary.get('method', '')}: loss and learning rate")
    top.legend()
    bottom.plot([x["step"] for x in train], [x["lr"] for x in train], color=c)
    bottom.set(xlabel="step", ylabel="learning rate")
    fig.tight_layout()
    save_figure(fig, folder / "curves.png")
    plt.close(fig)
    return ["curves.png", *_per_layer_plots(folder, {summary.get("method", "run"): summary})]


def summary_markdown(results: dict[str, dict[str, Any]], config: dict[str, Any]) -> str:
    """The comparison's table, the best method and those within noise of it (several seeds), and the learning-rate
    grid's results: what report.md and docs/results.md show."""
    from .spread import NOISE_RULE, best_and_ties

    parts = [markdown_table(list(columns(results)), table_rows(results))]
    metric = next((r["metric"] for r in results.values() if r.get("metric")), None)
    key = metric or "val_loss"
    best, ties = best_and_ties(results, key, lower=metric is None or "loss" in metric)
    if best and len(config.get("seeds") or [0]) > 1:
        tied = f"within noise of it: {', '.join(ties)}" if ties else "no other method is within noise of it"
        parts.append(f"**Best {key.replace('_', ' ')}: {best}**; {tied}. Rule: {NOISE_RULE}.")
    header, tuning = tuning_rows(results)
    if tuning:
        t = next(r["tuning"] for r in results.values() if r.get("tuning"))
        parts.append(
            f"Learning rate per method: the validation loss of a {t['steps']}-step run (seed {t['seed']}) at each "
            "rate of the grid; the full runs use the best.\n\n" + markdown_table(header, tuning)
        )
    return "\n\n".join(parts)


def write_report(
    folder: str | Path,
    results: dict[str, dict[str, Any]],
    config: dict[str, Any],
    runs: dict[str, dict[int, dict[str, Any]]] | None = None,
) -> Path:
    """``report.md``, ``metrics.json`` (with every seed's summary in ``runs``) and the PNG plots in ``folder``;
    returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = write_plots(folder, results)
    compact = {m: {k: v for k, v in r.items() if k != "curves"} for m, r in results.items()}
    write_atomic(
        folder / "metrics.json",
        json.dumps({"config": config, "results": compact, "runs": runs or {}}, indent=1, default=str),
    )
    if "task" in config:
        setting = (
            f"`{config['model']}` fine-tuned on `{config['task']}`, {config['steps']} steps, batch "
            f"{config['batch_size']} (max length {config['max_length']}, x{config['grad_accum']} "
            "accumulation)"
        )
    else:
        setting = (
            f"LLaMA-{config['preset']} on `{config['dataset']}`, {config['steps']} steps, batch "
            f"{config['batch_size']} x {config['seq_len']} tokens (x{config['grad_accum']} accumulation)"
        )
    seeds = config.get("seeds") or [config["seed"]]
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean ± sd)"
    lines = [
        "# gradspace compare",
        "",
        f"{setting}, {seeds_text}, device {config['device']}, dtype {config['dtype']}.",
        "",
        summary_markdown(results, config),
        "",
    ]
    lines += [
        (
            "Each method runs in its own process: peak memory is that process's maximum resident set size on CPU, "
            "`torch.cuda.max_memory_allocated` on GPU. `vs adamw`: the headline metric minus AdamW's (for a loss, "
            "negative is better)"
            + ("; one seed, so a difference smaller than the run-to-run spread is noise. " if len(seeds) == 1 else ". ")
            + "Subspace-update time is `optimizer.diagnostics()['update_seconds']` (basis computations and moves, "
            "with the moment transport); `x galore` divides it by GaLore's, whose updates are its SVDs. `x adamw`: "
            "optimizer state over AdamW's."
            + (" Runs shared the CPU (`--jobs`), so wall times are indicative." if config.get("jobs", 1) > 1 else "")
        ),
        "",
        *[f"![{p[:-4]}]({p})" for p in plots],
        "",
    ]
    path = folder / "report.md"
    write_atomic(path, "\n".join(lines))
    return path
