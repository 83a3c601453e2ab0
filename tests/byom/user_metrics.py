"""A metric of the user's own, as `eval.metric` names it: fn(predictions, labels) -> float."""

from __future__ import annotations

import numpy as np


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    classes = np.union1d(predictions, labels)
    f1 = []
    for c in classes:
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def error_rate(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions != labels))


def not_a_number(predictions: np.ndarray, labels: np.ndarray):
    return "high"
