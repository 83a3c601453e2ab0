"""A run's held-out test sample (``RUN/test_sample.safetensors``): up to ``NUM_TEST_SAMPLE`` examples in raw units,
written once by the classifier's data stage, read by the post-deploy check of ``slimray serve`` and by ``slimray
export``, so neither reads the user's data again. No ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TEST_SAMPLE = "test_sample.safetensors"
NUM_TEST_SAMPLE = 1024


def write_test_sample(run_dir: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Up to NUM_TEST_SAMPLE held-out examples in raw units (a seeded pick): what ``slimray serve`` checks the endpoint with, and what
    export checks against, without reading the user's data again."""
    pick = np.random.default_rng(0).permutation(len(y))[:NUM_TEST_SAMPLE]  # shuffled: files may be sorted by class
    tmp = run_dir / f".{TEST_SAMPLE}.tmp"
    save_file({"x": torch.from_numpy(np.ascontiguousarray(x[pick])), "y": torch.from_numpy(np.ascontiguousarray(y[pick]))}, str(tmp))
    tmp.replace(run_dir / TEST_SAMPLE)


def read_test_sample(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    t = load_file(str(Path(run_dir) / TEST_SAMPLE))
    return t["x"].numpy(), t["y"].numpy()
