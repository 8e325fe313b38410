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
