"""The ``gradspace compare`` report: a markdown table, matplotlib plots (Agg) and the raw metrics as JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

COLUMNS = ("method", "final val loss", "val ppl", "wall time s", "subspace update s", "optimizer state B",
           "peak memory B")


def columns(results: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """Pretraining shows validation loss and perplexity; fine-tuning its task's metric (a summary's ``metric``)."""
    metric = next((r["metric"] for r in results.values() if r.get("metric")), None)
    return COLUMNS if metric is None else ("method", f"val {metric}", "val loss", *COLUMNS[3:])


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for method, r in results.items():
        quality = ([f"{r[r['metric']]:.4f}", f"{r['val_loss']:.4f}"] if r.get("metric")
                   else [f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}"])
        rows.append([
            method,
            *quality,
            f"{r['wall_time']:.1f}",
            f"{r['update_seconds']:.2f}",
            f"{r['state_bytes']:,}",
            f"{r['peak_memory']:,}",
        ])
    return rows


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    cols = columns(results)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def text_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [list(columns(results))] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``L3.q_proj``; ``bert.encoder.layer.3.attention.self.query``
    -> ``L3.query``."""
    name = re.sub(r"^.*?layers?\.(\d+)\.", r"L\1.", name)
    for part, short in ((".self_attn.", "."), (".mlp.", "."), (".attention.self.", "."),
                        (".attention.output.", ".attn_out.")):
        name = name.replace(part, short)
    return name.replace(".weight", "")


def write_plots(folder: Path, results: dict[str, dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, r in results.items():
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h["loss"] for h in r["history"]], label=method, linewidth=1)
        if r.get("evals"):
            ax.plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], "o", markersize=3,
                    color=ax.lines[-1].get_color())
    ax.set(xlabel="step", ylabel="loss (lines: train, dots: validation)", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    written.append("loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = list(results)
    ax.bar(methods, [results[m]["state_bytes"] / 2**20 for m in methods], color="tab:blue")
    ax.set(ylabel="optimizer state (MiB)", title="Optimizer-state memory")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(folder / "state_bytes.png", dpi=110)
    plt.close(fig)
    written.append("state_bytes.png")

    for key, label, fname in (("rank", "rank", "rank.png"), ("energy", "captured energy", "energy.png")):
        projected = {m: r["weights"] for m, r in results.items() if r.get("weights")}
        fig, ax = plt.subplots(figsize=(10, 4.5))
        if projected:
            layers = sorted({w for ws in projected.values() for w in ws})
            width = 0.8 / len(projected)
            for i, (method, ws) in enumerate(projected.items()):
                values = [(ws.get(w) or {}).get(key) for w in layers]
                ax.bar([j + i * width for j in range(len(layers))], [v if v is not None else 0 for v in values],
                       width, label=method)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], [_short(w) for w in layers],
                          rotation=60, ha="right", fontsize=7)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ax.text(0.5, 0.5, "no projected method", ha="center", va="center", transform=ax.transAxes)
        ax.set(ylabel=label, title=f"Per-layer {label} at the end of training")
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write_report(folder: str | Path, results: dict[str, dict[str, Any]], config: dict[str, Any]) -> Path:
    """``report.md``, ``metrics.json`` and the PNG plots in ``folder``; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = write_plots(folder, results)
    (folder / "metrics.json").write_text(json.dumps({"config": config, "results": results}, indent=1,
                                                    default=str))
    if "task" in config:
        setting = (f"`{config['model']}` fine-tuned on `{config['task']}`, {config['steps']} steps, batch "
                   f"{config['batch_size']} (max length {config['max_length']}, x{config['grad_accum']} "
                   "accumulation)")
    else:
        setting = (f"LLaMA-{config['preset']} on `{config['dataset']}`, {config['steps']} steps, batch "
                   f"{config['batch_size']} x {config['seq_len']} tokens (x{config['grad_accum']} accumulation)")
    lines = [
        "# gradspace compare",
        "",
        f"{setting}, seed {config['seed']}, device {config['device']}, dtype {config['dtype']}.",
        "",
        markdown_table(results),
        "",
        ("Each method runs in its own process: peak memory is that process's maximum resident set size on CPU, "
         "`torch.cuda.max_memory_allocated` on GPU. Subspace-update time is "
         "`optimizer.diagnostics()['update_seconds']`."),
        "",
        *[f"![{p[:-4]}]({p})" for p in plots],
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
