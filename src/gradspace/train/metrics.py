"""GLUE metrics in numpy: accuracy, binary F1, Matthews correlation, Pearson and Spearman.

Written out here (a few lines each) so that fine-tuning needs neither scikit-learn nor scipy; edge cases follow
scikit-learn and scipy: F1 and the MCC are 0 when undefined, a correlation with a constant input is NaN.
"""

from __future__ import annotations

import numpy as np


def _arrays(pred, label) -> tuple[np.ndarray, np.ndarray]:
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    if pred.shape != label.shape or pred.size == 0:
        raise ValueError(
            f"predictions and labels must be non-empty and of equal length, got {pred.size} and {label.size}"
        )
    return pred, label


def accuracy(pred, label) -> float:
    pred, label = _arrays(pred, label)
    return float(np.mean(pred == label))


def f1_binary(pred, label, positive: int = 1) -> float:
    """F1 of the ``positive`` class (GLUE's MRPC/QQP metric): 2 TP / (2 TP + FP + FN); 0 with no positives."""
    pred, label = _arrays(pred, label)
    tp = np.sum((pred == positive) & (label == positive))
    fp = np.sum((pred == positive) & (label != positive))
    fn = np.sum((pred != positive) & (label == positive))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(pred, label) -> float:
    """Matthews correlation (CoLA's metric), multi-class form from the confusion matrix, as scikit-learn."""
    pred, label = _arrays(pred, label)
    classes, index = np.unique(np.concatenate([label, pred]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (index[: label.size], index[label.size :]), 1)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def pearson(x, y) -> float:
    x, y = _arrays(x, y)
    x, y = x.astype(np.float64) - np.mean(x), y.astype(np.float64) - np.mean(y)
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else float("nan")


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(counts.size)
    np.add.at(sums, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(x, y) -> float:
    x, y = _arrays(x, y)
    return pearson(rankdata(x), rankdata(y))


def classification_metrics(pred, label, num_labels: int) -> dict[str, float]:
    """accuracy and MCC; F1 of class 1 as well when the task is binary."""
    out = {"accuracy": accuracy(pred, label), "mcc": matthews_corrcoef(pred, label)}
    if num_labels == 2:
        out["f1"] = f1_binary(pred, label)
    return out


def regression_metrics(pred, label) -> dict[str, float]:
    pred, label = _arrays(pred, label)
    return {
        "pearson": pearson(pred, label),
        "spearman": spearman(pred, label),
        "mse": float(np.mean((pred.astype(np.float64) - label) ** 2)),
    }
