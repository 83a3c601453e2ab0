"""``slimray export``: a finished run's model (the winner, or any trial) as ONNX or a ``torch.export`` program.

    slimray export RUN_DIR --format onnx|torch-export [--trial KEY] --out FILE

The export is checked against the torch model on the run's held-out test data; the check (max absolute
logit difference, predicted-class agreement) is printed and written next to the file as ``FILE.check.json``.
An ONNX Runtime artifact exports the graph it runs (int8 QDQ included); a torch int8 artifact cannot go
to ONNX (its quantized modules have no ONNX form) and gets a clear error naming what to do instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

from slimray.families.classifier.artifacts import load_artifact, load_runnable, load_spec
from slimray.compress.export import check_outputs, export_onnx, export_program, load_program
from slimray.compress.runtime import ONNX_FILE, OrtModel
from slimray.config import check_name
from slimray.families.classifier.datasets import load_dataset, normalize
from slimray.families.classifier.sample import TEST_SAMPLE, read_test_sample
from slimray.storage import write_json_atomic
from slimray.schema import ConfigError

ExportFormat = Literal["onnx", "torch-export"]


def model_dir(run_dir: Path, trial: str | None) -> Path:
    """The winner's folder, or ``trials/KEY`` (a checked name: no path traversal)."""
    if trial is None:
        path = run_dir / "winner"
    else:
        try:
            check_name(trial, what="trial")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        path = run_dir / "trials" / trial
    if not (path / "spec.json").exists():
        have = sorted(p.name for p in (run_dir / "trials").glob("*") if (p / "spec.json").exists())
        raise ConfigError(f"no model at {path}" + (f"; trials in this run: {', '.join(have)}" if have else ""))
    return path


def held_out_inputs(run_dir: Path):
    """The run's held-out examples (raw units): its saved test sample, or, for runs made before it existed,
    the built-in dataset's test split."""
    if (run_dir / TEST_SAMPLE).exists():
        return read_test_sample(run_dir)[0]
    cfg = json.loads((run_dir / "config.json").read_text())
    return load_dataset(cfg["data"]["name"], seed=cfg["data"].get("seed", 0)).test.x


def export_run(run_dir: str | Path, *, fmt: ExportFormat, out: str | Path, trial: str | None = None) -> dict[str, Any]:
    run_dir, out = Path(run_dir), Path(out)
    src = model_dir(run_dir, trial)
    spec = load_spec(src)
    x = normalize(torch.from_numpy(held_out_inputs(run_dir)), spec.input)
    reference, _ = load_runnable(src)  # what the run measured and serves
    if fmt == "onnx":
        if spec.runtime.name == "onnxruntime":
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
            tmp.write_bytes((src / ONNX_FILE).read_bytes())
            os.replace(tmp, out)
        else:
            export_onnx(load_artifact(src)[0], x[:1], out)
        candidate = OrtModel(out)
    else:
        model, _ = load_artifact(src)
        export_program(model, x[:4], out)
        candidate = load_program(out)
    check = {"format": fmt, "source": str(src), "runtime": spec.runtime.name, "quantization": spec.quantization.method,
             "bytes": out.stat().st_size, **check_outputs(reference, candidate, x)}
    check["summary"] = (f"check on {check['num_examples']} held-out examples: max abs logit difference "
                        f"{check['max_abs_diff']:.3g}, same class {check['class_agreement']:.2f}%")
    write_json_atomic(out.with_name(out.name + ".check.json"), check)
    return check
