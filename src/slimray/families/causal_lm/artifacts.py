"""Causal-LM artifacts (pure torch/transformers, no ray, no pickle): a standard HF folder (safetensors + config +
tokenizer) that plain ``transformers`` loads, plus ``slimray_lm.json`` recording how slimray runs it: the
quantization applied at load (int8 modules are not safetensors-serialisable, so the float weights are stored and
re-quantized when loaded), the runtime, and the reports that produced it (kept layers, widths, KD).

Written into a temporary sibling folder and renamed, so a folder that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from slimray.families.causal_lm.quantize import QuantMethod, quantize_lm
from slimray.families.causal_lm.runtime import RuntimeName
from slimray.families.causal_lm.teacher import load_causal_lm
from slimray.schema import StrictModel

META_FILE = "slimray_lm.json"


class LMArtifactMeta(StrictModel):
    """What ``slimray_lm.json`` holds."""

    format: Literal["slimray.causal_lm/1"] = "slimray.causal_lm/1"
    quant_method: QuantMethod = "none"
    keep_float: list[str] = Field(default_factory=list)
    runtime: RuntimeName = "hf_eager"
    reports: dict = Field(default_factory=dict, description="pruning / distillation reports, JSON-serialisable")


def save_lm(model: torch.nn.Module, tokenizer, out_dir: str | Path, *, meta: LMArtifactMeta | None = None) -> Path:
    """Write the float ``model`` + ``tokenizer`` + meta into ``out_dir`` atomically (``out_dir`` must not exist)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; artifacts are written once")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text((meta or LMArtifactMeta()).model_dump_json(indent=2) + "\n")
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_meta(path: str | Path) -> LMArtifactMeta:
    f = Path(path) / META_FILE
    return LMArtifactMeta.from_dict(json.loads(f.read_text()), source=str(f)) if f.is_file() else LMArtifactMeta()


def load_lm(path: str | Path):
    """``(model, tokenizer, meta)`` with the recorded quantization applied (eval mode)."""
    meta = load_meta(path)
    model, tok = load_causal_lm(path)
    if meta.quant_method != "none":
        model = quantize_lm(model, method=meta.quant_method, keep_float=meta.keep_float, inplace=True)
    return model, tok, meta
