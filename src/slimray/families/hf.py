"""Local Hugging Face folders (written by ``save_pretrained``), checked the same way for every family: a folder
(never a hub id: nothing is downloaded), a readable ``config.json`` without remote code (``auto_map``;
``trust_remote_code`` stays off), of an architecture the family takes, with safetensors weights (a
``pytorch_model.bin`` is a pickle and is refused). Pure; reads JSON only."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any


def read_hf_folder(path: str, *, field: str, model_types: Collection[str] | None = None, what: str = "model",
                   files: Sequence[str] = ("model.safetensors",)) -> dict[str, Any]:
    """``config.json`` of the folder at ``path`` after the checks above; errors are ValueErrors naming ``field``."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"{field} {path!r} is not a folder; slimray loads no model from a hub: save it with "
            "save_pretrained(folder) where the hub is reachable and give that folder"
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{field} {path!r} has no config.json (expected a folder written by save_pretrained)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{field} {path!r}: config.json is not JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{field} {path!r}: config.json is not a JSON object")
    if cfg.get("auto_map"):
        raise ValueError(f"{field} {path!r}: config.json asks for remote code (auto_map); slimray never runs it")
    if model_types is not None and cfg.get("model_type") not in model_types:
        raise ValueError(f"{field} {path!r}: model_type {cfg.get('model_type')!r}; {what} takes {', '.join(sorted(model_types))}")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        hint = " (pytorch_model.bin is a pickle and is not loaded: save with safe_serialization=True)" if "model.safetensors" in missing else ""
        raise ValueError(f"{field} {path!r} lacks {', '.join(missing)}{hint}")
    return cfg
