"""Embedding quality against the teacher on held-out sentences (pure numpy / scikit-learn, no ray).

* ``cosine_to_teacher``: mean cosine between a model's and the teacher's normalised embeddings;
* ``neighbour_recall``: for each sentence, the share of the teacher's k nearest neighbours (among the
  held-out sentences, itself excluded) that the model's k nearest neighbours also contain;
* ``probe_accuracy``: a logistic-regression probe fitted on embeddings of train-article sentences,
  scored on held-out-article sentences (the 5 BBC topics).
"""

from __future__ import annotations

import warnings

import numpy as np


def cosine_to_teacher(emb: np.ndarray, teacher: np.ndarray) -> float:
    return float(np.mean(np.sum(emb * teacher, axis=1)))


def _topk(emb: np.ndarray, k: int) -> np.ndarray:
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k, axis=1)[:, :k]


def neighbour_recall(emb: np.ndarray, teacher: np.ndarray, *, k: int = 10) -> float:
    a, b = _topk(emb.astype(np.float32), k), _topk(teacher.astype(np.float32), k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def probe_accuracy(train_emb: np.ndarray, train_labels, test_emb: np.ndarray, test_labels, *, c: float, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit(train_emb, np.asarray(train_labels))
    return float(100.0 * np.mean(clf.predict(test_emb) == np.asarray(test_labels)))


def quality(*, probe_train: np.ndarray, probe_train_labels, heldout: np.ndarray, heldout_labels, teacher_heldout: np.ndarray,
            k: int, probe_c: float, seed: int = 0) -> dict[str, float]:
    return {
        "cosine_to_teacher": cosine_to_teacher(heldout, teacher_heldout),
        f"neighbour_recall_at_{k}": neighbour_recall(heldout, teacher_heldout, k=k),
        "probe_accuracy": probe_accuracy(probe_train, probe_train_labels, heldout, heldout_labels, c=probe_c, seed=seed),
    }
