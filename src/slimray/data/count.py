"""How many examples a data path holds, read cheaply (no Ray): what ``slimray init`` sizes its starter budget by.

Parquet from its footers, ``.npz`` from the label array alone, CSV / JSON Lines by counting lines, an image folder
by counting image files. Counting stops at ``limit``: past that the exact number changes nothing a caller decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimray.data.files_config import FileFormat

SUFFIXES: dict[str, tuple[str, ...]] = {"parquet": (".parquet", ".pq"), "csv": (".csv",), "jsonl": (".jsonl", ".json", ".ndjson"), "npz": (".npz",)}


def _files(path: Path, fmt: FileFormat) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES.get(fmt, ()) and not p.name.startswith("."))


def _lines(path: Path, *, limit: int) -> int:
    n = 0
    with open(path, "rb") as f:
        for line in f:
            n += bool(line.strip())
            if n > limit:
                break
    return n


def count_examples(path: str | Path, fmt: FileFormat, *, label_column: str = "y", limit: int = 1_000_000) -> int | None:
    """Examples under ``path`` (at most about ``limit``), or None when they cannot be counted without reading the data
    (e.g. an ``.npz`` without ``label_column``)."""
    path = Path(path)
    if fmt == "image_folder":
        from slimray.data.files import IMAGE_SUFFIXES

        n = 0
        for p in path.rglob("*"):
            n += p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            if n > limit:
                break
        return n
    total = 0
    for f in _files(path, fmt):
        if fmt == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(f).metadata.num_rows
        elif fmt == "npz":
            with np.load(f, allow_pickle=False) as z:
                if label_column not in z.files:
                    return None
                total += len(z[label_column])
        else:  # csv has a header line
            total += _lines(f, limit=limit) - (fmt == "csv")
        if total > limit:
            break
    return total
