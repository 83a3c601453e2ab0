"""Counting a data path's examples without Ray (what `slimray init` sizes its budget by): every format counts the
examples it holds, a folder of files counts them all, and an .npz without the label array is not guessed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_files import write_all  # noqa: E402

from slimray.data.count import count_examples  # noqa: E402

N = 57


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("countdata")
    rng = np.random.default_rng(0)
    x, y = rng.random((N, 8, 8)).astype(np.float32), rng.integers(0, 10, N)
    return root, write_all(root, x, y)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "npz", "image_folder"])
def test_every_format_counts_its_examples(files, fmt):
    _, spec = files
    assert count_examples(spec[fmt]["train"], fmt) == N


def test_a_folder_of_files_counts_them_all_and_limit_stops_early(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"part{i}.npz", x=np.zeros((10, 4)), y=np.zeros(10, dtype=np.int64))
    (tmp_path / "notes.txt").write_text("not data\n")
    assert count_examples(tmp_path, "npz") == 30
    assert count_examples(tmp_path, "npz", limit=15) == 20  # stops after the file that passed the limit


def test_an_npz_without_the_label_array_is_not_counted(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 4)), target=np.zeros(5))
    assert count_examples(tmp_path / "d.npz", "npz") is None
    assert count_examples(tmp_path / "d.npz", "npz", label_column="target") == 5
