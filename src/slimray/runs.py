"""Run folders shared by the image and text pipelines: ``OUT/<name>/`` with the config that made it.

A rerun with the same name must have the same config (serving options aside), or ``--fresh`` to start over.
The folder is locked for the process that prepared it (``slimray.runlock``): a second run of the same name
fails at once naming the holder, and ``--fresh`` never deletes a live run. Pure python: no ray import.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pydantic import BaseModel

from slimray.storage import write_json_atomic
from slimray.runlock import LOCK_NAME, RunLock
from slimray.schema import ConfigError


def log(msg: str) -> None:
    print(f"[slimray {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_run_dir(cfg: BaseModel, out_dir: Path, *, fresh: bool = False) -> Path:
    """``OUT/<cfg.name>/``, created, with ``config.json`` written; refuses a different config under the same name."""
    run_dir = (Path(out_dir) / cfg.name).resolve()
    RunLock(run_dir).acquire(log=log)  # before anything is read or deleted; held until this process exits
    saved = run_dir / "config.json"
    current = json.loads(cfg.model_dump_json())
    if saved.exists() and not fresh:
        # serving options do not change what the run produces: only the rest must match
        strip = lambda d: {k: v for k, v in d.items() if k != "serve"}  # noqa: E731
        if strip(json.loads(saved.read_text())) != strip(current):
            raise ConfigError(
                f"{run_dir} holds a run with a different config; pass --fresh to start it over or choose another name"
            )
    elif fresh:
        for entry in run_dir.iterdir():  # everything but our own lock
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, current)
    return run_dir
