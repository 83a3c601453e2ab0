"""``slimray init``: a starter config for the user's own model and data, checked before it is written.

It imports the factory, loads the weights into what it returns (listing any mismatch), tells the data's
format from the path, and writes a commented YAML file whose every field is a real config field: the file
is validated with the same ``PipelineConfig`` that ``slimray run --config`` uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from slimray.config import PipelineConfig, check_name, resolve_paths
from slimray.data.files_config import infer_format
from slimray.families.classifier.usermodule import build_from_factory, load_weights
from slimray.schema import ConfigError

HEADER = """\
# slimray config written by `slimray init`. Run it with:
#   slimray run --config {path}
# Every field is documented in docs/configuration.md; unknown fields are errors.
# data: your files, read with Ray Data. Set input_column/label_column (or feature_columns) to your columns.
# data.mean/std: the normalisation your teacher was trained with, applied before the model (here and in the
# server); 0 and 1 feed inputs as read (images scaled to [0, 1]); one value or one per channel.
# teacher: your factory + safetensors weights. distill.derive: the student is your teacher pruned to `keep`
# of its parameters, then distilled. search: prune ratios x quantizations x runtimes, the winner is the
# fastest within max_accuracy_drop points of the teacher.
"""


def starter_config(
    *, model: str, weights: str, data: str, code_dir: str | None, name: str, kwargs: dict[str, Any], num_workers: int
) -> dict[str, Any]:
    fmt = infer_format(data)
    if fmt is None:
        raise ConfigError(f"--data {data}: cannot tell its format (a .parquet/.csv/.jsonl/.npz file, or a folder of class sub-folders)")
    # the teacher is already trained: it gets its inputs as read unless the user states its normalisation
    # (statistics computed from the data would feed it inputs it never saw)
    d: dict[str, Any] = {"source": "files", "name": name, "format": fmt, "train": data, "mean": 0.0, "std": 1.0}
    if fmt != "image_folder":
        d.update(input_column="x", label_column="y")
    return {
        "name": name,
        "data": d,
        "teacher": {"source": "module", "factory": model, "kwargs": kwargs, "weights": weights, "code_dir": code_dir},
        "distill": {"derive": {"keep": 0.5, "by": "params"}, "epochs": 10, "batch_size": 128, "num_workers": num_workers},
        "search": {
            "space": {"prune_ratios": [0.0, 0.25, 0.5], "quantizations": ["none", "dynamic_int8"], "runtimes": ["torch", "onnxruntime"]},
            "finetune_epochs": 1, "max_accuracy_drop": 1.0,
        },
        "serve": {"host": "127.0.0.1", "port": 8000},
    }


def write_starter(
    out: Path, *, model: str, weights: str, data: str, code_dir: str | None = None, name: str | None = None,
    kwargs: dict[str, Any] | None = None, num_workers: int = 2, force: bool = False,
) -> Path:
    """Check the model and weights, then write the starter config to ``out`` (refuses to overwrite)."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    base = out.resolve().parent
    rel = lambda p: os.path.relpath(Path(p).resolve(), base)  # noqa: E731  (paths in the file: relative to it)
    name = check_name(name or Path(data).resolve().stem.replace("_", "-") or "my-model", what="--name")
    module = build_from_factory(model, kwargs or {}, code_dir=code_dir, field="--model")
    load_weights(module, weights, field="--weights")
    cfg = starter_config(model=model, weights=rel(weights), data=rel(data), code_dir=rel(code_dir) if code_dir else None,
                         name=name, kwargs=kwargs or {}, num_workers=num_workers)
    resolve_paths(PipelineConfig.from_dict(json.loads(json.dumps(cfg)), source="the starter config"), base)
    text = HEADER.format(path=out) + yaml.safe_dump(cfg, sort_keys=False)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out
