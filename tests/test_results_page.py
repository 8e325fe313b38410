"""docs/results.md is generated from the published runs: it cannot drift from them, and each claim's verdict
follows the noise rule."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("results_tool", ROOT / "tools" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def test_the_page_matches_the_published_metrics():
    assert results.main(["--check"]) == 0


def test_an_edited_table_is_caught_and_rewritten():
    text = results.PAGE.read_text()
    generated = results.blocks()
    edited = text.replace(generated["claims"].splitlines()[2], "| GaLore | made up |", 1)
    assert edited != text and results.rewrite(edited, generated) == text
    with pytest.raises(SystemExit, match="no <!-- generated: claims -->"):
        results.rewrite("no markers here", generated)


def _r(loss, sd=None):
    return {"val_loss": loss, **({"spread": {"val_loss": sd}} if sd is not None else {})}


@pytest.mark.parametrize(
    ("expect", "a", "b", "verdict"),
    [
        ("better", _r(2.0, 0.01), _r(2.1, 0.01), "reproduces"),
        ("better", _r(2.09, 0.01), _r(2.1, 0.01), "cannot tell: within noise"),
        ("better", _r(2.2, 0.01), _r(2.1, 0.01), "does not reproduce: worse"),
        ("not worse", _r(2.11, 0.01), _r(2.1, 0.01), "reproduces: within noise"),
        ("not worse", _r(2.0, 0.01), _r(2.1, 0.01), "reproduces: better"),
        ("not worse", _r(2.2, 0.01), _r(2.1, 0.01), "does not reproduce: worse"),
        ("better", _r(2.0), _r(2.1), "cannot tell: one seed"),
    ],
)
def test_verdicts_follow_the_noise_rule(expect, a, b, verdict):
    claim = {"claim": "x", "method": "a", "versus": "b", "expect": expect}
    ours, text = results.verdict(claim, {"a": a, "b": b})
    assert text == verdict and f"{a['val_loss']:.4f}" in ours


def _task(f1, sd, loss=0.5):
    return {"metric": "f1", "f1": f1, "val_loss": loss, "spread": {"f1": sd, "val_loss": 0.001}}


@pytest.mark.parametrize(
    ("expect", "a", "b", "verdict"),
    [
        ("not worse", _task(0.95, 0.01), _task(0.90, 0.01), "reproduces: better"),
        ("not worse", _task(0.90, 0.01), _task(0.95, 0.01), "does not reproduce: worse"),
        ("not worse", _task(0.94, 0.01, 0.9), _task(0.95, 0.01, 0.1), "reproduces: within noise"),
        ("better", _task(0.95, 0.01, 0.9), _task(0.90, 0.01, 0.1), "reproduces"),
    ],
)
def test_a_fine_tuning_claim_is_judged_by_its_task_metric_higher_is_better(expect, a, b, verdict):
    """The validation losses point the other way in the last two cases: the verdict must follow f1, not them."""
    claim = {"claim": "x", "study": "s", "method": "a", "versus": "b", "expect": expect, "metric": "task"}
    ours, text = results.verdict(claim, {"a": a, "b": b})
    assert text == verdict and ours.startswith(f"f1 {a['f1']:.4f}")


def test_a_task_claim_on_a_pretraining_study_or_an_unknown_metric_is_an_error():
    claim = {"claim": "x", "study": "1-pretrain", "method": "a", "versus": "b", "expect": "better", "metric": "task"}
    with pytest.raises(ValueError, match="has no task metric"):
        results.verdict(claim, {"a": _r(2.0, 0.1), "b": _r(2.1, 0.1)})
    with pytest.raises(ValueError, match="metric must be 'val_loss' or 'task'"):
        results.verdict({**claim, "metric": "bleu"}, {"a": _r(2.0, 0.1), "b": _r(2.1, 0.1)})
