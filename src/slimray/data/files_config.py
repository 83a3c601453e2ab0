"""The config of a dataset on disk (``data.source: files``): where the splits are, which columns hold what.

Pure pydantic (no ray): the pipeline config imports it. Reading happens in ``slimray.data.files`` with Ray Data.
Paths are absolute or relative to the config file's folder (``resolve_paths``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from slimray.schema import StrictModel

FileFormat = Literal["parquet", "csv", "jsonl", "npz", "image_folder"]
SUFFIX_FORMATS: dict[str, FileFormat] = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".npz": "npz",
}


def infer_format(path: str | Path) -> FileFormat | None:
    """A format from a file's suffix, or from the files in a folder (sub-folders only: an image folder)."""
    path = Path(path)
    if path.is_file():
        return SUFFIX_FORMATS.get(path.suffix.lower())
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        suffixes = {SUFFIX_FORMATS.get(p.suffix.lower()) for p in entries if p.is_file()} - {None}
        if len(suffixes) == 1:
            return suffixes.pop()
        if entries and all(p.is_dir() for p in entries):
            return "image_folder"
    return None


class FilesDataConfig(StrictModel):
    """The user's data: Parquet, CSV, JSON Lines, NumPy ``.npz`` or an image folder (one sub-folder per class).

    Splits are separate paths (``val``, ``test``), or carved out of ``train`` by a seeded hash of each example
    (``val_fraction`` / ``test_fraction``), so the same example always lands in the same split.
    """

    source: Literal["files"]
    name: str = Field("files", description="the dataset's name in reports")
    format: FileFormat | None = Field(None, description="default: from the train path's suffix (a folder of sub-folders: image_folder)")
    train: str = Field(description="file or folder of the training split")
    val: str | None = Field(None, description="file or folder of the validation split (default: carved out of train)")
    test: str | None = Field(None, description="file or folder of the test split (default: carved out of train)")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = Field(0, description="seed of the hash that carves val/test out of train")
    input_column: str = Field("x", description="column (or .npz array) holding one example (a list or tensor)")
    feature_columns: list[str] | None = Field(None, description="tabular data: these numeric columns form the input vector")
    label_column: str = Field("y", description="column (or .npz array) holding the integer class")
    input_shape: list[PositiveInt] | None = Field(None, description="reshape each example to this (default: as stored)")
    num_classes: PositiveInt | None = Field(None, description="default: the largest training label + 1")
    mean: float | list[float] | None = Field(None, description="normalisation; one value or one per channel (default: from train)")
    std: float | list[float] | None = Field(None, description="normalisation; one value or one per channel (default: from train)")
    min_value: float | None = Field(None, description="smallest raw value a request may send (default: train's minimum)")
    max_value: float | None = Field(None, description="largest raw value a request may send (default: train's maximum)")
    image_mode: Literal["L", "RGB"] | None = Field(None, description="image_folder: grey or colour (default: from the first image)")
    max_eval_examples: PositiveInt = Field(50_000, description="val and test are read into memory up to this many examples")

    @model_validator(mode="after")
    def _columns(self) -> FilesDataConfig:
        if self.feature_columns is not None and not self.feature_columns:
            raise ValueError("feature_columns, when given, needs at least one column")
        if self.feature_columns is not None and self.label_column in self.feature_columns:
            raise ValueError(f"label_column {self.label_column!r} is also listed in feature_columns")
        return self

    def resolve_paths(self, base: Path) -> FilesDataConfig:
        """Relative paths made absolute against ``base`` (the config file's folder)."""
        upd = {k: str((base / v).resolve()) for k in ("train", "val", "test") if (v := getattr(self, k)) is not None and not Path(v).is_absolute()}
        return self.model_copy(update=upd)

    def file_format(self) -> FileFormat:
        fmt = self.format or infer_format(self.train)
        if fmt is None:
            raise ValueError(f"data.format: cannot tell the format of {self.train!r}; set data.format to one of parquet, csv, jsonl, npz, image_folder")
        return fmt
