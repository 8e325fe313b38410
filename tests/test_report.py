"""The compare report: differences and ratios against AdamW and GaLore, one colour per method, no empty plots."""

import pytest

from gradspace.train import report


def summary(val_loss, state, update_s, ranks):
    return {
        "val_loss": val_loss,
        "val_ppl": 2.718**val_loss,
        "wall_time": 10.0,
        "update_seconds": update_s,
        "state_bytes": state,
        "peak_memory": 1 << 20,
        "history": [{"step": 1, "loss": 4.0}],
        "evals": [{"step": 1, "val_loss": val_loss}],
        "weights": {f"model.layers.0.mlp.w{i}.weight": {"rank": r, "energy": 0.5} for i, r in enumerate(ranks)},
    }


RESULTS = {
    "adamw": {**summary(2.0, 1000, 0.0, []), "weights": {}},
    "galore": summary(2.1, 330, 2.0, [32, 32]),
    "adarank": summary(2.3, 100, 1.0, [3, 5]),
}


def test_rows_show_differences_and_ratios():
    rows = {r[0]: r for r in report.table_rows(RESULTS)}
    cols = report.columns(RESULTS)
    at = {c: i for i, c in enumerate(cols)}
    assert rows["galore"][at["vs adamw"]] == "+0.1000" and rows["adamw"][at["vs adamw"]] == "-"
    assert rows["galore"][at["x adamw"]] == "0.33" and rows["adarank"][at["x adamw"]] == "0.10"
    assert rows["adarank"][at["x galore"]] == "0.50" and rows["galore"][at["x galore"]] == "1.00"


def test_every_method_keeps_its_colour_and_unknown_ones_get_distinct_ones():
    assert report.color("galore", RESULTS) == report.color("galore", {"galore": 1, "x": 2}) == "tab:blue"
    extra = {"a-new": 1, "b-new": 2}
    assert report.color("a-new", extra) != report.color("b-new", extra)


def test_rank_plot_only_when_a_rank_varies(tmp_path):
    fixed = {k: v for k, v in RESULTS.items() if k != "adarank"}
    assert "rank.png" not in report.write_plots(tmp_path, fixed)
    assert "rank.png" in report.write_plots(tmp_path, RESULTS)
    assert (tmp_path / "state_bytes.png").stat().st_size > 1000


def test_several_seeds_show_mean_and_spread_and_mark_differences_within_noise():
    def seeds(loss, sd):
        return {**summary(loss, 100, 1.0, [8]), "n": 3, "seeds": [0, 1, 2], "spread": {"val_loss": sd}}

    results = {"adamw": seeds(2.0, 0.02), "galore": seeds(2.03, 0.02), "fira": seeds(2.1, 0.02)}
    rows = {r[0]: r for r in report.table_rows(results)}
    at = {c: i for i, c in enumerate(report.columns(results))}
    assert rows["galore"][at["val loss"]] == "2.0300 ± 0.0200"
    assert rows["galore"][at["vs adamw"]] == "+0.0300 (noise)"  # 0.03 <= 0.02 + 0.02
    assert rows["fira"][at["vs adamw"]] == "+0.1000"  # beyond the spreads: a real difference
    text = report.summary_markdown(results, {"seeds": [0, 1, 2]})
    assert "**Best val loss: adamw**; within noise of it: galore." in text


def test_the_tuning_table_marks_a_rate_at_the_edge_of_the_grid():
    tuned = {
        "galore": {**RESULTS["galore"], "tuning": {"val_loss": {"0.001": 2.5, "0.003": 2.2, "0.01": 2.1},
                                                   "chosen": 0.01, "steps": 5, "seed": 0}},
        "adamw": {**RESULTS["adamw"], "tuning": {"val_loss": {"0.001": 2.3, "0.003": 2.2, "0.01": float("inf")},
                                                 "chosen": 0.003, "steps": 5, "seed": 0}},
    }  # fmt: skip
    header, rows = report.tuning_rows(tuned)
    assert header == ["method", "lr 0.001", "lr 0.003", "lr 0.01", "chosen"]
    assert rows[0][-1] == "0.01 (edge of the grid)" and rows[1] == ["adamw", "2.3000", "2.2000", "diverged", "0.003"]


def test_a_seeds_mean_curve_is_smoothed_over_steps_not_points():
    """A resumed seed is logged every 10 steps before its checkpoint: the smoothing window (1/50 of the run) is a
    span of steps, so at step 250 it averages steps 220-250, not the 22 points back to step 30."""
    from gradspace.train.report import _curves

    def loss(t):
        return 1000.0 / t

    every = {"history": [{"step": t, "loss": loss(t)} for t in range(1, 2001)], "evals": []}
    resumed = {"history": [{"step": t, "loss": loss(t)} for t in [*range(10, 1000, 10), *range(1000, 2001)]]}
    (steps, smooth), _ = _curves({"curves": {"0": every, "1": {**resumed, "evals": []}}})
    at = dict(zip(steps, smooth))
    assert loss(250) <= at[250] <= loss(220)
    assert at[2000] == pytest.approx(sum(loss(t) for t in range(1962, 2001)) / 39)


def _balanced(text):
    """Whether every ( and [ closes, in order (markdown links and images included)."""
    stack = []
    for ch in text:
        if ch in "([":
            stack.append(ch)
        elif ch in ")]" and (not stack or stack.pop() != {")": "(", "]": "["}[ch]):
            return False
    return not stack


def _tables(text):
    """Each markdown table's rows as lists of cells (an escaped \\| stays inside its cell)."""
    import re

    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(re.split(r"(?<!\\)\|", line.strip())[1:-1])
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
@pytest.mark.parametrize("task", [False, True])
def test_the_report_closes_its_brackets_and_its_tables_keep_their_columns(tmp_path, seeds, task):
    results = {m: dict(r) for m, r in RESULTS.items()}
    results["galore:proj=a|b"] = results.pop("adarank")  # a method label with a pipe, from its options
    results["galore"]["tuning"] = {"val_loss": {"0.001": 2.5, "0.01": float("inf")}, "chosen": 0.001, "steps": 2,
                                   "seed": 0}  # fmt: skip
    if len(seeds) > 1:
        for r in results.values():
            r.update(n=len(seeds), seeds=seeds, spread={"val_loss": 0.01, "val_ppl": 0.02})
    config = {"steps": 6, "batch_size": 4, "grad_accum": 1, "seed": 0, "seeds": seeds, "device": "cpu",
              "dtype": "float32", "jobs": 2}  # fmt: skip
    if task:
        config.update(task="trec", model="minilm", max_length=32)
        for r in results.values():
            r.update(metric="accuracy", accuracy=0.5)
    else:
        config.update(preset="tiny", dataset="shakespeare", seq_len=32)
    text = report.write_report(tmp_path, results, config).read_text()
    assert _balanced(text), text
    tables = _tables(text)
    assert len(tables) == 2  # the comparison and the learning-rate grid
    for rows in tables:
        assert {len(r) for r in rows} == {len(rows[0])}, rows
    assert len(tables[0]) == 2 + len(results) and len(tables[0][0]) == len(report.columns(results))
