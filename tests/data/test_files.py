"""The user's data on disk through Ray Data: every format gives the same examples, splits carved by hash are
stable and disjoint, and bad files fail before training naming the field and the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "byom"))
import project  # noqa: E402

from slimray.data.files import load_files_data  # noqa: E402
from slimray.data.files_config import FilesDataConfig, infer_format  # noqa: E402
from slimray.schema import ConfigError  # noqa: E402

N = 400


@pytest.fixture(scope="module")
def arrays():
    x, y = project.digits_arrays()
    return x[:N], y[:N]


def cfg(**kw) -> FilesDataConfig:
    return FilesDataConfig.model_validate({"source": "files", **kw})


def sorted_rows(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def write_all(root: Path, x, y) -> dict[str, dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    project.write_parquet(root / "d.parquet", x, y)
    cols = project.write_csv(root / "d.csv", x, y)
    with open(root / "d.jsonl", "w") as f:
        for row, label in zip(x, y):
            f.write(json.dumps({"img": row.tolist(), "target": int(label)}) + "\n")
    np.savez(root / "d.npz", x=x, y=y)
    project.write_image_folder(root / "imgs", x, y)
    pq.write_table(pa.table({"pixels": [r.reshape(-1).tolist() for r in x]}), root / "nolabel.parquet")
    return {
        "parquet": dict(train=str(root / "d.parquet"), input_column="pixels", label_column="label", input_shape=[1, 8, 8]),
        "csv": dict(train=str(root / "d.csv"), feature_columns=cols, label_column="label", input_shape=[1, 8, 8]),
        "jsonl": dict(train=str(root / "d.jsonl"), input_column="img", label_column="target", input_shape=[1, 8, 8]),
        "npz": dict(train=str(root / "d.npz"), input_shape=[1, 8, 8]),
        "image_folder": dict(train=str(root / "imgs")),
    }


@pytest.fixture(scope="module")
def files(arrays, tmp_path_factory):
    root = tmp_path_factory.mktemp("userdata")
    return root, write_all(root, *arrays)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "npz", "image_folder"])
def test_every_format_reads_the_same_examples(ray_session, files, arrays, fmt):
    root, specs = files
    assert infer_format(specs[fmt]["train"]) == fmt
    fd = load_files_data(cfg(**specs[fmt], val_fraction=0.2, test_fraction=0.2, seed=1))
    x, y = arrays
    assert fd.num_train + len(fd.val) + len(fd.test) == N
    assert fd.input.shape == [1, 8, 8] and fd.num_classes == 10
    got = np.concatenate([fd.val.x, fd.test.x])
    assert got.dtype == np.float32
    tol = 1 / 255 if fmt == "image_folder" else 1e-5  # PNGs hold 8-bit pixels
    # val + test are the examples the seeded hash chose: each is one of the originals
    orig = sorted_rows(x)
    for row in got.reshape(len(got), -1)[:20]:
        assert np.abs(orig - row).max(axis=1).min() <= tol
    if fmt == "image_folder":
        assert fd.classes == [f"class_{i}" for i in range(10)]
        assert (fd.input.min_value, fd.input.max_value) == (0.0, 1.0)


def test_hash_split_is_stable_disjoint_and_seeded(ray_session, files):
    _, specs = files
    a = load_files_data(cfg(**specs["npz"], seed=5))
    b = load_files_data(cfg(**specs["npz"], seed=5))
    c = load_files_data(cfg(**specs["npz"], seed=6))
    np.testing.assert_array_equal(a.val.x, b.val.x)
    va, te = {r.tobytes() for r in a.val.x}, {r.tobytes() for r in a.test.x}
    assert not va & te
    assert {r.tobytes() for r in c.val.x} != va


def test_per_channel_statistics_are_computed_from_train(ray_session, files, arrays):
    _, specs = files
    fd = load_files_data(cfg(**{**specs["npz"], "input_shape": [4, 16]}))  # 4 "channels" of 16 values
    assert isinstance(fd.input.mean, list) and len(fd.input.mean) == 4
    x = arrays[0].reshape(N, 4, 16)
    assert abs(fd.input.mean[0] - float(x[:, 0].mean())) < 0.05


@pytest.mark.parametrize(
    ("make", "field", "needle"),
    [
        ("missing_label", "data.label_column", "no column 'label'"),
        ("missing_input", "data.input_column", "no column 'nope'"),
        ("mixed_shapes", "data.input_column", "examples of different shapes"),
        ("labels_out_of_range", "data.num_classes", "label 9"),
        ("unreadable_image", "data.train", "unreadable image"),
        ("mixed_image_sizes", "data", "images of different sizes"),
        ("npz_missing_array", "data.input_column", "no array 'x'"),
    ],
)
def test_bad_data_fails_naming_field_and_file(ray_session, tmp_path, arrays, make, field, needle):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    x, y = arrays
    bad_file = tmp_path / "bad.parquet"
    c: dict = {"train": str(bad_file), "input_column": "pixels", "label_column": "label"}
    if make == "missing_label":
        pq.write_table(pa.table({"pixels": [r.reshape(-1).tolist() for r in x]}), bad_file)
    elif make == "missing_input":
        project.write_parquet(bad_file, x, y)
        c["input_column"] = "nope"
    elif make == "mixed_shapes":
        rows = [r.reshape(-1).tolist() for r in x]
        rows[7] = rows[7][:50]
        pq.write_table(pa.table({"pixels": rows, "label": y}), bad_file)
    elif make == "labels_out_of_range":
        project.write_parquet(bad_file, x, y)
        c["num_classes"] = 9
    elif make in ("unreadable_image", "mixed_image_sizes"):
        root = tmp_path / "imgs"
        project.write_image_folder(root, x[:50], y[:50])
        target = next((root / "class_3").iterdir())
        if make == "unreadable_image":
            target.write_bytes(b"not a png")
        else:
            Image.fromarray(np.zeros((9, 9), dtype=np.uint8), mode="L").save(target)
        bad_file = target
        c = {"train": str(root)}
    else:
        np.savez(tmp_path / "bad.npz", pixels=x, y=y)
        bad_file = tmp_path / "bad.npz"
        c = {"train": str(bad_file)}
    with pytest.raises(ConfigError) as err:
        load_files_data(cfg(**c))
    msg = str(err.value)
    assert msg.startswith(field) and needle in msg, msg
    assert str(bad_file) in msg, msg


def test_config_rejects_unknown_format_and_label_in_features():
    with pytest.raises(ValueError, match="label_column 'y' is also listed"):
        cfg(train="x.csv", feature_columns=["a", "y"])
    with pytest.raises(ValueError):
        cfg(train="x.csv", format="xlsx")


@pytest.mark.long
def test_a_builtin_dataset_streams_through_ray_data_like_files(ray_session, tmp_path):
    """data: {name: digits, stream: true}: the built-in splits are written once as Parquet and read back as a
    files source: the teacher's outputs are a Ray Data job and the Train workers read shards of them."""
    import json

    from slimray.config import PipelineConfig
    from slimray.families.classifier.datasets import load_digits
    from slimray.pipelines import run_pipeline

    from ..conftest import tiny_digits_config

    cfg = tiny_digits_config("digits-stream").model_dump()
    cfg["data"]["stream"] = True
    cfg["search"]["space"] = {"prune_ratios": [0.0], "quantizations": ["none"], "runtimes": ["torch"]}
    cfg["distill"]["labels_only_baseline"] = False  # the stream is the point here, not the baseline (a third Train run)
    report = run_pipeline(PipelineConfig.model_validate(cfg), out_dir=tmp_path)
    run_dir = tmp_path / "digits-stream"
    digits = load_digits(seed=cfg["data"]["seed"])
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["test.parquet", "train.parquet", "val.parquet"]
    assert list((run_dir / "teacher_outputs").glob("*.parquet"))
    lines = [json.loads(line) for line in (run_dir / "logs" / "student_metrics.jsonl").read_text().splitlines()]
    # every epoch read the whole training split from the shards (Ray Data's equal split of 2 may drop an odd row)
    assert lines and all(len(digits.train) - 1 <= m["samples_seen"] <= len(digits.train) for m in lines)
    assert report["dataset"] == "digits" and report["winner_test"]["accuracy"] > 80.0
