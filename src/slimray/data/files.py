"""The user's data on disk, read with Ray Data: Parquet, CSV, JSON Lines, ``.npz`` or an image folder.

Every format becomes one lazy ``ray.data.Dataset`` with two columns: ``x`` (one example as a float32 tensor in
the data's raw units) and ``y`` (int64 class). Nothing is pulled whole onto the driver: one streaming pass over
the training split checks it (columns, shapes, labels, readable images) and computes the normalisation and
value range; the validation and test splits are read into memory (they are evaluated on the driver, up to
``max_eval_examples``). The training split stays a dataset: the teacher's outputs are a Ray Data batch-inference
job over it (``teacher_outputs``) written into the run folder, and Ray Train workers read shards of that.

Bad data fails here, before training, with a message naming the field and the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimray.families.classifier.datasets import Split, rows_within_budget
from slimray.data.files_config import FilesDataConfig
from slimray.families.classifier.spec import InputSpec
from slimray.schema import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_MARK = "slimray data error: "
TEACHER_OUTPUTS = "teacher_outputs"


class DataError(ValueError):
    """Raised inside Ray Data tasks; its message is lifted out of Ray's wrapping on the driver."""

    def __init__(self, message: str):
        super().__init__(_MARK + message)


def _lift(err: BaseException) -> ConfigError | None:
    m = re.search(re.escape(_MARK) + r"(.*)", str(err))
    return ConfigError(m.group(1).strip()) if m else None


@dataclass
class FilesData:
    name: str
    input: InputSpec
    num_classes: int
    train: Any  # ray.data.Dataset with columns x (raw float32 tensor), y (int64)
    num_train: int
    val: Split
    test: Split
    classes: list[str] | None = None  # image folders: class index -> sub-folder name


# --- reading one split into (x, y) ----------------------------------------------------------------------

def _rows_as_array(values: Any, *, paths: Any, field: str) -> np.ndarray:
    """A batch of examples (lists, nested lists or tensors) as one float32 array; mixed shapes name the file."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float32, copy=False)
    rows = [np.asarray(v.tolist() if hasattr(v, "tolist") else v, dtype=np.float32) for v in values]
    first = rows[0].shape
    for i, r in enumerate(rows):
        if r.shape != first:
            raise DataError(f"{field}: examples of different shapes {list(first)} and {list(r.shape)} in {paths[i]}")
    return np.stack(rows)


def _labels(values: Any, *, paths: Any, field: str, num_classes: int | None) -> np.ndarray:
    try:
        y = np.asarray(values)
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise ValueError("not whole numbers")
        y = y.astype(np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{field}: labels must be integers ({err}) in {paths[0]}") from None
    bad = np.flatnonzero((y < 0) | (y >= num_classes)) if num_classes is not None else np.flatnonzero(y < 0)
    if bad.size:
        i = int(bad[0])
        limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise DataError(f"data.num_classes: label {int(y[i])} in {paths[i]} is outside {limit}")
    return y


def _table_to_xy(batch: dict[str, np.ndarray], *, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    paths = batch.get("path", ["?"] * len(next(iter(batch.values()))))
    cols = [c for c in batch if c != "path"]
    feats = spec["feature_columns"]
    need = (feats or [spec["input_column"]]) + [spec["label_column"]]
    missing = [c for c in need if c not in batch]
    if missing:
        field = "data.feature_columns" if feats and missing[0] in feats else (
            "data.label_column" if missing[0] == spec["label_column"] else "data.input_column")
        raise DataError(f"{field}: no column {missing[0]!r} in {paths[0]}; its columns are {cols}")
    if feats:
        try:
            x = np.stack([np.asarray(batch[c], dtype=np.float32) for c in feats], axis=1)
        except (TypeError, ValueError) as err:
            raise DataError(f"data.feature_columns: non-numeric values ({err}) in {paths[0]}") from None
    else:
        x = _rows_as_array(batch[spec["input_column"]], paths=paths, field="data.input_column")
    if spec["input_shape"]:
        want = int(np.prod(spec["input_shape"]))
        if int(np.prod(x.shape[1:])) != want:
            raise DataError(f"data.input_shape {spec['input_shape']}: an example has {int(np.prod(x.shape[1:]))} values, not {want}, in {paths[0]}")
        x = x.reshape(len(x), *spec["input_shape"])
    y = _labels(batch[spec["label_column"]], paths=paths, field="data.label_column", num_classes=spec["num_classes"])
    return {"x": x, "y": y}


def _decode_images(batch: dict[str, np.ndarray], *, mode: str | None, num_classes: int | None) -> dict[str, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    xs = []
    for path in batch["path"]:
        try:
            with Image.open(path) as im:
                im.load()
                img = im.convert(mode) if mode else im
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"data.train: unreadable image {path}: {err}") from None
        xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    first = xs[0].shape
    for p, a in zip(batch["path"], xs):
        if a.shape != first:
            raise DataError(f"data: images of different sizes {list(first)} (channels, height, width) and {list(a.shape)}: {p}")
    y = _labels(batch["y"], paths=batch["path"], field="data.train", num_classes=num_classes)
    return {"x": np.stack(xs), "y": y}


def _carve(batch: dict[str, np.ndarray], *, seed: int, lo: float, hi: float) -> dict[str, np.ndarray]:
    """Keep the rows whose seeded hash falls in [lo, hi): a split that depends only on the example."""
    key = seed.to_bytes(8, "little", signed=True)
    u = np.array([
        int.from_bytes(hashlib.blake2b(row.tobytes() + bytes([int(lab) % 256]), digest_size=8, key=key).digest(), "little") / 2**64
        for row, lab in zip(batch["x"], batch["y"])
    ])
    keep = (u >= lo) & (u < hi)
    return {"x": batch["x"][keep], "y": batch["y"][keep]}


def _image_index(root: Path, *, field: str) -> tuple[list[dict[str, Any]], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{field} {root}: an image folder needs one sub-folder per class; none found")
    items = []
    for label, c in enumerate(classes):
        for dirpath, _, files in os.walk(root / c):
            items += [{"path": str(Path(dirpath) / f), "y": label} for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ConfigError(f"{field} {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under the class folders")
    return items, classes


def read_split(cfg: FilesDataConfig, path: str, *, field: str, classes: list[str] | None = None):
    """One split as a lazy dataset of (x, y); also the class names for an image folder."""
    import ray.data

    from slimray.console import quiet_ray_data

    quiet_ray_data()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{field}: no such file or folder: {path}")
    fmt = cfg.file_format()
    spec = {k: getattr(cfg, k) for k in ("input_column", "feature_columns", "label_column", "input_shape", "num_classes")}
    if fmt == "image_folder":
        if not p.is_dir():
            raise ConfigError(f"{field} {path}: format image_folder needs a folder with one sub-folder per class")
        items, found = _image_index(p, field=field)
        if classes is not None and set(found) - set(classes):
            raise ConfigError(f"{field} {path}: class folders {sorted(set(found) - set(classes))} are not in the training split's {classes}")
        if classes is not None:  # label ids follow the training split's class order
            index = {c: i for i, c in enumerate(classes)}
            items = [{"path": it["path"], "y": index[found[it["y"]]]} for it in items]
        ds = ray.data.from_items(items).map_batches(
            _decode_images, fn_kwargs={"mode": cfg.image_mode, "num_classes": cfg.num_classes}, batch_format="numpy", batch_size=256
        )
        return ds, (classes or found)
    if fmt == "npz":
        return _read_npz(p, spec=spec, field=field), None
    if fmt == "parquet":
        ds = ray.data.read_parquet(path, include_paths=True)
    elif fmt == "csv":
        ds = ray.data.read_csv(path, include_paths=True)
    else:
        ds = ray.data.read_json(path, lines=True, include_paths=True)
    return ds.map_batches(_table_to_xy, fn_kwargs={"spec": spec}, batch_format="numpy", batch_size=1024), None


def _read_npz(path: Path, *, spec: dict[str, Any], field: str):
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as err:
        raise ConfigError(f"{field} {path}: not a readable .npz without pickle: {err}") from None
    for name, what in ((spec["input_column"], "data.input_column"), (spec["label_column"], "data.label_column")):
        if name not in arrays:
            raise ConfigError(f"{what}: no array {name!r} in {path}; its arrays are {sorted(arrays)}")
    n = len(arrays[spec["label_column"]])
    batch = {spec["input_column"]: arrays[spec["input_column"]], spec["label_column"]: arrays[spec["label_column"]],
             "path": np.array([str(path)] * n)}
    try:
        out = _table_to_xy(batch, spec=spec)
    except DataError as err:
        raise ConfigError(str(err).removeprefix(_MARK)) from None
    return ray.data.from_arrow(pa.table({"x": ArrowTensorArray.from_numpy(out["x"]), "y": pa.array(out["y"])}))


# --- the whole data config -----------------------------------------------------------------------------

def _scan(ds, *, field: str) -> dict[str, Any]:
    """One streaming pass: count, shape, label range, value range and per-channel moments."""
    n, shape, y_min, y_max, lo, hi = 0, None, None, None, np.inf, -np.inf
    s1 = s2 = None
    try:
        for b in ds.iter_batches(batch_size=2048, batch_format="numpy"):
            x, y = b["x"], b["y"]
            if not len(y):
                continue
            if shape is None:
                shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != shape:
                raise ConfigError(f"{field}: examples of different shapes {list(shape)} and {list(x.shape[1:])}")
            xc = x.reshape(len(x), shape[0], -1).astype(np.float64) if len(shape) > 1 else x.reshape(len(x), 1, -1).astype(np.float64)
            s1 = xc.sum(axis=(0, 2)) if s1 is None else s1 + xc.sum(axis=(0, 2))
            s2 = (xc**2).sum(axis=(0, 2)) if s2 is None else s2 + (xc**2).sum(axis=(0, 2))
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
            y_min = int(y.min()) if y_min is None else min(y_min, int(y.min()))
            y_max = int(y.max()) if y_max is None else max(y_max, int(y.max()))
            n += len(y)
    except ConfigError:
        raise
    except Exception as err:  # an error inside a Ray Data task: lift our message out of Ray's wrapping
        lifted = _lift(err)
        if lifted is not None:
            raise lifted from None
        raise
    if n == 0:
        raise ConfigError(f"{field}: no examples")
    per = xc.shape[2] * n
    mean = s1 / per
    std = np.sqrt(np.maximum(s2 / per - mean**2, 1e-12))
    return {"n": n, "shape": list(shape), "y_min": y_min, "y_max": y_max, "min": lo, "max": hi, "mean": mean.tolist(), "std": std.tolist()}


def _collect(ds, *, limit: int, field: str) -> Split:
    xs, ys = [], []
    try:
        for b in ds.limit(limit).iter_batches(batch_size=4096, batch_format="numpy"):
            xs.append(b["x"])
            ys.append(b["y"])
    except Exception as err:
        lifted = _lift(err)
        if lifted is not None:
            raise lifted from None
        raise
    if not ys or not sum(len(y) for y in ys):
        raise ConfigError(f"{field}: no examples")
    return Split(np.ascontiguousarray(np.concatenate(xs), dtype=np.float32), np.concatenate(ys).astype(np.int64))


def load_files_data(cfg: FilesDataConfig) -> FilesData:
    """Open the splits, check the training split in one streaming pass, read val/test; fails naming field and file."""
    try:
        cfg.file_format()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    train, classes = read_split(cfg, cfg.train, field="data.train")
    carve = cfg.val is None or cfg.test is None
    if carve:
        v_hi = cfg.val_fraction if cfg.val is None else 0.0
        t_hi = v_hi + (cfg.test_fraction if cfg.test is None else 0.0)
        kw = {"batch_format": "numpy", "batch_size": 1024}
        whole = train
        val_ds = whole.map_batches(_carve, fn_kwargs={"seed": cfg.seed, "lo": 0.0, "hi": v_hi}, **kw) if cfg.val is None else None
        test_ds = whole.map_batches(_carve, fn_kwargs={"seed": cfg.seed, "lo": v_hi, "hi": t_hi}, **kw) if cfg.test is None else None
        train = whole.map_batches(_carve, fn_kwargs={"seed": cfg.seed, "lo": t_hi, "hi": 1.0}, **kw)
    stats = _scan(train, field="data.train")
    num_classes = cfg.num_classes or stats["y_max"] + 1
    if num_classes < 2:
        raise ConfigError(f"data.label_column: the training split {cfg.train} has a single class; a classifier needs at least 2")
    shape = stats["shape"]
    if cfg.val is not None:
        val_ds = read_split(cfg, cfg.val, field="data.val", classes=classes)[0]
    if cfg.test is not None:
        test_ds = read_split(cfg, cfg.test, field="data.test", classes=classes)[0]
    limit = rows_within_budget(shape, cfg.max_eval_examples)
    val = _collect(val_ds, limit=limit, field="data.val" if cfg.val else "data.val_fraction")
    test = _collect(test_ds, limit=limit, field="data.test" if cfg.test else "data.test_fraction")
    for split, field in ((val, "data.val"), (test, "data.test")):
        if list(split.x.shape[1:]) != shape:
            raise ConfigError(f"{field}: examples shaped {list(split.x.shape[1:])}, the training split's are {shape}")
        if split.y.size and (split.y.max() >= num_classes or split.y.min() < 0):
            raise ConfigError(f"data.num_classes: {field} has label {int(split.y.max())}, outside [0, {num_classes})")
    channels = shape[0] if len(shape) > 1 else 1

    def per_channel(given, computed: list[float]):
        if given is not None:
            return given
        return computed if channels > 1 else float(computed[0])

    mean, std = per_channel(cfg.mean, stats["mean"]), per_channel(cfg.std, stats["std"])
    is_images = cfg.file_format() == "image_folder"
    lo = cfg.min_value if cfg.min_value is not None else (0.0 if is_images else stats["min"])
    hi = cfg.max_value if cfg.max_value is not None else (1.0 if is_images else stats["max"])
    if hi <= lo:
        hi = lo + 1.0
    try:
        spec = InputSpec(shape=shape, mean=mean, std=std, min_value=lo, max_value=hi)
    except ValueError as err:
        raise ConfigError(f"data.mean/std: {err}") from None
    return FilesData(name=cfg.name, input=spec, num_classes=num_classes, train=train, num_train=stats["n"], val=val, test=test, classes=classes)


# --- built-in datasets as files: the same source, read the same way -------------------------------------

def builtin_as_files(ds: Any, out_dir: Path) -> FilesDataConfig:
    """A built-in dataset (``slimray.data.Dataset``) written once as Parquet (one file per split, a fixed-size
    list column ``x`` and ``y``) into ``out_dir`` (temporary folder + rename; reused when present), and the files
    config that reads it back: the built-in data then goes through Ray Data like the user's files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (out_dir / "train.parquet").exists():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for split in ("train", "val", "test"):
            sp = getattr(ds, split)
            flat = np.ascontiguousarray(sp.x.reshape(len(sp.y), -1), dtype=np.float32)
            col = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
            pq.write_table(pa.table({"x": col, "y": pa.array(sp.y.astype(np.int64))}), tmp / f"{split}.parquet")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    spec = ds.input
    return FilesDataConfig(
        source="files", name=ds.name, format="parquet", train=str(out_dir / "train.parquet"), val=str(out_dir / "val.parquet"),
        test=str(out_dir / "test.parquet"), input_shape=list(spec.shape), num_classes=ds.num_classes, mean=spec.mean, std=spec.std,
        min_value=spec.min_value, max_value=spec.max_value, max_eval_examples=max(len(ds.val), len(ds.test)),
    )


# --- teacher outputs: a Ray Data batch-inference job ----------------------------------------------------

class _TeacherOutputs:
    """Callable class for ``map_batches``: the teacher rebuilt from its artifact's bytes in each actor by its family
    (``Recipe.load_bytes``), which adds its outputs to each batch (``Recipe.teacher_outputs``)."""

    def __init__(self, files: dict[str, bytes], family: str):
        import torch

        from slimray import families

        torch.set_num_threads(1)
        self.recipe = families.get(family).load("recipe")()
        self.model = self.recipe.load_bytes(files).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.recipe.teacher_outputs(self.model, batch)


def write_teacher_outputs(train, *, teacher_dir: Path, family: str, out_dir: Path, batch_size: int = 512) -> Path:
    """Run the teacher once over the training split (one actor) and write each batch with its outputs (the classifier:
    x, y, logits) as Parquet into ``out_dir`` (written to a temporary sibling, then renamed: a half-written folder never
    looks finished)."""
    import shutil

    from slimray import families

    files = families.get(family).load("recipe")().artifact_files(teacher_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (train.map_batches(
        _TeacherOutputs, fn_constructor_kwargs={"files": files, "family": family},
        batch_size=batch_size, batch_format="numpy", concurrency=1, num_cpus=1,
    ).write_parquet(str(tmp)))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def open_stream(source: Any, run_dir: Path) -> FilesData:
    """A family's streamed training data opened (``Recipe.stream_source``): a files section, or a built-in dataset
    written once as Parquet under ``RUN/data`` and read back the same way."""
    if not isinstance(source, FilesDataConfig):
        source = builtin_as_files(source, run_dir / "data")
    from slimray.runs import log

    log(f"data: reading {source.train} with Ray Data (one checking pass over the training split)")
    return load_files_data(source)


def read_sample(path: Path, *, limit: int) -> dict[str, np.ndarray]:
    """Up to ``limit`` rows of the teacher outputs as arrays (the compression sweep fine-tunes on these)."""
    import ray.data

    parts: dict[str, list[np.ndarray]] = {"x": [], "y": [], "logits": []}
    for b in ray.data.read_parquet(str(path)).limit(limit).iter_batches(batch_size=4096, batch_format="numpy"):
        for k in parts:
            parts[k].append(b[k])
    return {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}
