"""``slimray init``: a starter config for the user's own model and data, checked before it is written.

It imports the factory, loads the weights into what it returns (listing any mismatch), tells the data's
format from the path, and writes a commented YAML file whose every field is a real config field: the file
is validated with the same ``PipelineConfig`` that ``slimray run --config`` uses.

Two things depend on the data (``starter_budget``). The training budget is sized by the number of examples:
ten epochs of batch 128 are thousands of optimizer steps on MNIST but 60 on 1,400 examples, too few for a derived
student to recover (a user's ViT on 8x8 digits: 93.7% on held-out examples after 60 steps, 96.9% after 210,
teacher 96.4%), so small data gets smaller batches and more fine-tune epochs. And the accuracy budget is only
meaningful against a teacher scored on examples it never trained on: ``--test`` names such a file, and the
teacher's accuracy there becomes the reference (``search.teacher_reference_split: test``); without it the
teacher is scored on a validation split carved out of ``--data``, which a teacher trained on all of ``--data``
has memorised (that ViT: 100% there, so a student had to make at most one error in 175 unseen examples).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from slimray.config import PipelineConfig, check_name, resolve_paths
from slimray.data.count import count_examples
from slimray.data.files_config import FileFormat, infer_format
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
# fastest within max_accuracy_drop points of the teacher, measured on examples the teacher never saw: pass
# `slimray init --test FILE` with such examples if your teacher was trained on all of the data (else its
# accuracy on the validation split carved out of `train` is its training accuracy, which no student matches).
# distill.batch_size and search.finetune_epochs were sized to the number of examples ({num_examples}).
"""

DISTILL_EPOCHS = 10
MIN_DISTILL_STEPS = 200  # optimizer steps of the starter's distillation (measured: 60 left a derived ViT 2.7 points short)
MIN_FINETUNE_STEPS = 60  # steps of the KD fine-tune after each sweep pruning (batch 128; 11 left a 25%-pruned ViT at 87%)
MAX_FINETUNE_EPOCHS = 6
FINETUNE_BATCH = 128  # what the sweep's fine-tune uses (slimray.families.classifier.kd.finetune)


def starter_budget(num_examples: int | None, *, num_workers: int, held_out_test: bool) -> dict[str, int]:
    """``batch_size`` (per worker) and ``finetune_epochs`` for ``num_examples`` in the training file: batch 128 and
    one fine-tune epoch unless the data is too small for ``MIN_DISTILL_STEPS`` / ``MIN_FINETUNE_STEPS`` steps; then
    halved down to 16, and up to ``MAX_FINETUNE_EPOCHS`` epochs. Unknown counts keep the defaults."""
    batch, finetune_epochs = 128, 1
    if not num_examples:
        return {"batch_size": batch, "finetune_epochs": finetune_epochs}
    # the val (and, without a held-out test file, the test) fraction is carved out of the file: 0.1 each by default
    num_train = max(1, round(num_examples * (0.9 if held_out_test else 0.8)))
    while batch > 16 and DISTILL_EPOCHS * math.ceil(num_train / (num_workers * batch)) < MIN_DISTILL_STEPS:
        batch //= 2
    finetune_epochs = min(MAX_FINETUNE_EPOCHS, math.ceil(MIN_FINETUNE_STEPS / math.ceil(num_train / FINETUNE_BATCH)))
    return {"batch_size": batch, "finetune_epochs": finetune_epochs}


def starter_config(
    *, model: str, weights: str, data: str, code_dir: str | None, name: str, kwargs: dict[str, Any], num_workers: int,
    test: str | None = None, num_examples: int | None = None, fmt: FileFormat | None = None,
) -> dict[str, Any]:
    """The starter config as a dict; ``test``: a held-out file the teacher never saw (its accuracy there is the
    budget's reference); ``num_examples``: how many ``data`` holds (sizes the training budget); ``fmt``: the data's
    format (default: from ``data``'s path)."""
    fmt = fmt or infer_format(data)
    if fmt is None:
        raise ConfigError(f"--data {data}: cannot tell its format (a .parquet/.csv/.jsonl/.npz file, or a folder of class sub-folders)")
    # the teacher is already trained: it gets its inputs as read unless the user states its normalisation
    # (statistics computed from the data would feed it inputs it never saw)
    d: dict[str, Any] = {"source": "files", "name": name, "format": fmt, "train": data, "mean": 0.0, "std": 1.0}
    if test is not None:
        d["test"] = test
    if fmt != "image_folder":
        d.update(input_column="x", label_column="y")
    budget = starter_budget(num_examples, num_workers=num_workers, held_out_test=test is not None)
    search: dict[str, Any] = {
        "space": {"prune_ratios": [0.0, 0.25, 0.5], "quantizations": ["none", "dynamic_int8"], "runtimes": ["torch", "onnxruntime"]},
        "finetune_epochs": budget["finetune_epochs"], "max_accuracy_drop": 1.0,
    }
    if test is not None:
        search["teacher_reference_split"] = "test"
    return {
        "name": name,
        "data": d,
        "teacher": {"source": "module", "factory": model, "kwargs": kwargs, "weights": weights, "code_dir": code_dir},
        "distill": {"derive": {"keep": 0.5, "by": "params"}, "epochs": DISTILL_EPOCHS, "batch_size": budget["batch_size"],
                    "num_workers": num_workers},
        "search": search,
        "serve": {"host": "127.0.0.1", "port": 8000},
    }


def write_starter(
    out: Path, *, model: str, weights: str, data: str, code_dir: str | None = None, name: str | None = None,
    kwargs: dict[str, Any] | None = None, num_workers: int = 2, force: bool = False, test: str | None = None,
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
    fmt = infer_format(data)
    if test is not None and infer_format(test) != fmt:
        raise ConfigError(f"--test {test}: not the same format as --data ({fmt}): {infer_format(test) or 'unknown'}")
    num_examples = count_examples(data, fmt) if fmt is not None else None
    cfg = starter_config(model=model, weights=rel(weights), data=rel(data), code_dir=rel(code_dir) if code_dir else None,
                         name=name, kwargs=kwargs or {}, num_workers=num_workers, test=rel(test) if test else None,
                         num_examples=num_examples, fmt=fmt)
    resolve_paths(PipelineConfig.from_dict(json.loads(json.dumps(cfg)), source="the starter config"), base)
    counted = "not counted" if num_examples is None else f"{num_examples} in {Path(data).name}"
    text = HEADER.format(path=out, num_examples=counted) + yaml.safe_dump(cfg, sort_keys=False)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out
