"""Rerun the comparison protocol of docs/results.md and regenerate the page's tables from the runs, so the page
cannot drift from the code.

    python tools/results.py              # every study of docs/results/protocol/ (resuming), then the tables
    python tools/results.py --only 1-pretrain
    python tools/results.py --tables     # only rewrite the tables from docs/results/<study>/metrics.json
    python tools/results.py --check      # exit 1 when docs/results.md differs from what those metrics give

Each ``docs/results/protocol/<study>.toml`` is a ``gradspace compare --config`` file; its runs go to
``runs/results/<study>`` (a rerun continues them: Ctrl-C is safe), and its report, plots and metrics are copied
to ``docs/results/<study>/``. ``claims.toml`` holds each paper's claim; its verdict is computed from the runs by
the noise rule of ``gradspace.train.spread``. The page's generated parts sit between
``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gradspace.train.report import summary_markdown  # noqa: E402
from gradspace.train.spread import within_noise  # noqa: E402

PROTOCOL = ROOT / "docs" / "results" / "protocol"
PUBLISHED = ROOT / "docs" / "results"
RUNS = ROOT / "runs" / "results"
PAGE = ROOT / "docs" / "results.md"
HISTORY_EVERY = 10  # the published per-step curves keep every 10th step


def studies() -> list[str]:
    return sorted(p.stem for p in PROTOCOL.glob("*.toml") if p.stem != "claims")


def run_study(name: str) -> None:
    argv = [sys.executable, "-m", "gradspace", "compare", "--config", str(PROTOCOL / f"{name}.toml")]
    code = subprocess.run([*argv, "--out", str(RUNS / name)], cwd=ROOT, check=False).returncode
    if code:
        print(f"results: {name} stopped (exit {code}); run the same command again to continue it", file=sys.stderr)
        raise SystemExit(code)


def publish(name: str) -> None:
    """The report, plots and metrics of a finished study, into docs/results/<study>/ (curves thinned)."""
    src, dst = RUNS / name, PUBLISHED / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in [src / "report.md", *src.glob("*.png")]:
        shutil.copy2(f, dst / f.name)
    metrics = json.loads((src / "metrics.json").read_text())
    for runs in [metrics["results"], *metrics.get("runs", {}).values()]:
        for r in runs.values():
            r["history"] = [h for h in r.get("history", []) if h["step"] % HISTORY_EVERY == 0]
    (dst / "metrics.json").write_text(json.dumps(metrics, indent=1))


def load(name: str) -> dict | None:
    path = PUBLISHED / name / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdict(claim: dict, results: dict) -> tuple[str, str]:
    """(ours, verdict) for a claim that ``method`` is ``better`` than, or ``not worse`` than, ``versus`` in
    validation loss, or in the fine-tuning task's own metric (higher is better) when the claim says
    ``metric = "task"``."""
    a, b = results.get(claim["method"]), results.get(claim["versus"])
    if a is None or b is None:
        return "not run", "cannot tell: not run yet"
    key = "val_loss"
    if claim.get("metric") == "task":
        key = a.get("metric") or ""
        if not key:
            raise ValueError(f"claim {claim['claim']!r}: metric = 'task' but {claim.get('study')} has no task metric")
    elif claim.get("metric", "val_loss") != "val_loss":
        raise ValueError(f"claim {claim['claim']!r}: metric must be 'val_loss' or 'task', not {claim['metric']!r}")
    diff = a[key] - b[key]
    gain = -diff if key == "val_loss" else diff  # positive: ``method`` is better
    sa, sb = (a.get("spread") or {}).get(key), (b.get("spread") or {}).get(key)
    ours = ("" if key == "val_loss" else f"{key} ") + f"{a[key]:.4f}" + (f" ± {sa:.4f}" if sa is not None else "")
    ours += f" vs {b[key]:.4f}" + (f" ± {sb:.4f}" if sb is not None else "") + f" (diff {diff:+.4f})"
    noise = within_noise(a, b, key)
    if noise is None:
        return ours, "cannot tell: one seed"
    if claim["expect"] == "better":
        text = "cannot tell: within noise" if noise else "reproduces" if gain > 0 else "does not reproduce: worse"
    elif claim["expect"] == "not worse":
        text = (
            "reproduces: within noise" if noise else "reproduces: better" if gain > 0 else "does not reproduce: worse"
        )
    else:
        raise ValueError(f"claim {claim['claim']!r}: expect must be 'better' or 'not worse'")
    return ours, text


def claims_table() -> str:
    from gradspace.train.report import markdown_table

    claims = tomllib.loads((PROTOCOL / "claims.toml").read_text())["claim"]
    rows = []
    for c in claims:
        metrics = load(c["study"])
        ours, text = verdict(c, metrics["results"]) if metrics else ("not run", "cannot tell: not run yet")
        here = f"{c['method']} vs {c['versus']}"
        rows.append([c["paper"], c["claim"], c["paper_number"], c["study"], here, ours, text])
    header = [
        "paper",
        "claim",
        "paper's number",
        "study",
        "here",
        "ours: val loss, or the named task metric (mean ± sd)",
        "verdict",
    ]
    return markdown_table(header, rows)


def blocks() -> dict[str, str]:
    out = {"claims": claims_table()}
    for name in studies():
        metrics = load(name)
        out[name] = summary_markdown(metrics["results"], metrics["config"]) if metrics else "(not run yet)"
    return out


def rewrite(text: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(
            rf"(<!-- generated: {re.escape(name)} -->\n).*?(<!-- end generated: {re.escape(name)} -->)", re.S
        )
        if not pattern.search(text):
            raise SystemExit(f"results: docs/results.md has no <!-- generated: {name} --> block")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="a study (file stem); repeatable")
    p.add_argument("--tables", action="store_true", help="only regenerate the page's tables")
    p.add_argument("--check", action="store_true", help="exit 1 if the page differs from the published metrics")
    args = p.parse_args(argv)
    if not (args.tables or args.check):
        for name in args.only or studies():
            run_study(name)
            publish(name)
    text = PAGE.read_text()
    new = rewrite(text, blocks())
    if args.check:
        if new != text:
            print("results: docs/results.md differs from docs/results/*/metrics.json; run tools/results.py --tables")
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
