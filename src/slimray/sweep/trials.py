"""The one Tune trainable of the compression searches: one trial per candidate key, for every model family.

``run_trials`` runs ``measure(key, shared)`` (a module-level function: the family's build-and-measure of one
candidate, pure torch) as one Ray Tune trial per key, on the shared engine (``slimray.sweep.engine.run_tuner``:
a grid, ``max_concurrent_trials`` at once, one torch thread each, resumable). What every family gets the same way:

- the large inputs (``shared``: data, teacher outputs, evaluation sets) go to the object store once and each trial
  fetches them (``ray.get``), lists of arrays included;
- a trial's result is written to ``RUN/trials/<key>.json`` atomically; a key whose file exists is never rerun (a
  rerun or a resumed sweep keeps finished trials);
- a failing trial writes ``RUN/trials/<key>.error.json`` (the error, a line of ``advice``, the traceback) and the
  search goes on; its result comes back as ``{"status": "error", "error": ..., "advice": ...}``;
- without Tune (``use_tune=False``, small searches and tests) the same function runs in the driver, in order.
"""

from __future__ import annotations

import json
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray import tune

from slimray.storage import write_json_atomic

Measure = Callable[[str, dict[str, Any]], Any]
Advice = Callable[[str, str], str]


def result_path(run_dir: str | Path, key: str) -> Path:
    return Path(run_dir) / "trials" / f"{key}.json"


def _fetch(value: Any) -> Any:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _put(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return ray.put(value)


def _record_error(out: Path, err: BaseException, *, key: str, advice: Advice | None) -> None:
    message = repr(err)
    write_json_atomic(out.with_suffix(".error.json"), {
        "error": message, "advice": advice(message, key) if advice is not None else None, "traceback": traceback.format_exc(),
    })


def _report(payload: Any, metric: str | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {"done": 1}
    if metric and isinstance(payload, dict) and isinstance(payload.get(metric), (int, float)):
        metrics[metric] = payload[metric]
    return metrics


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The trainable: one key, its result file, or its error file."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    key = config["key"]
    out = result_path(ctx["run_dir"], key)
    try:
        if out.exists():
            payload = json.loads(out.read_text())
        else:
            shared = {k: _fetch(v) for k, v in ctx["shared"].items()}
            payload = ctx["measure"](key, shared)
            write_json_atomic(out, payload)
        tune.report(_report(payload, ctx["metric"]))
    except Exception as err:  # a failing trial is recorded, the search goes on
        _record_error(out, err, key=key, advice=ctx["advice"])
        raise


def read_result(run_dir: str | Path, key: str, *, advice: Advice | None = None) -> Any:
    """A key's result, or its error as ``{"status": "error", "error", "advice"}`` (``trial did not finish`` when neither
    file exists)."""
    out = result_path(run_dir, key)
    if out.exists():
        return json.loads(out.read_text())
    err = out.with_suffix(".error.json")
    saved = json.loads(err.read_text()) if err.exists() else {"error": "trial did not finish"}
    msg = saved["error"]
    return {"status": "error", "error": msg,
            "advice": saved.get("advice") or (advice(msg, key) if advice is not None else None)}


def run_trials(
    *, run_dir: str | Path, keys: list[str], measure: Measure, shared: dict[str, Any], run_name: str,
    max_concurrent_trials: int, metric: str | None = None, advice: Advice | None = None, use_tune: bool = True,
    cpus_per_trial: float = 1.0, reuse_actors: bool = True, describe: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Every key's result (``measure``'s JSON payload, or an error dict), in ``keys`` order. ``reuse_actors=False``
    gives each trial a fresh process (an engine that patches its process, such as vLLM's)."""
    run_dir = Path(run_dir)
    todo = [k for k in keys if not result_path(run_dir, k).exists()]
    if todo and use_tune:
        from slimray.sweep.engine import make_tune_config, run_tuner

        ctx = {"run_dir": str(run_dir), "measure": measure, "advice": advice, "metric": metric,
               "shared": {k: _put(v) for k, v in shared.items()}}
        tune_config = make_tune_config(algorithm="grid", num_samples=None, max_concurrent_trials=max_concurrent_trials,
                                       metric="done", mode="max")
        tune_config.reuse_actors = reuse_actors
        run_tuner(
            tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": cpus_per_trial}),
            param_space={"key": tune.grid_search(todo)},
            tune_config=tune_config,
            run_name=run_name, storage_path=str((run_dir / "ray").resolve()), resume=True,
            describe=lambda c: describe(c["key"]) if describe else c["key"],
        )
    elif todo:
        for key in todo:
            out = result_path(run_dir, key)
            try:
                write_json_atomic(out, measure(key, shared))
            except Exception as err:  # as in a trial: recorded, the search goes on
                _record_error(out, err, key=key, advice=advice)
    return {k: read_result(run_dir, k, advice=advice) for k in keys}


def measure_with_recipe(key: str, shared: dict[str, Any], *, family: str, config_json: str, run_dir: str,
                        candidates: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """A family's candidate as a trial: ``candidates[key]`` = (student name, settings); the family's ``Recipe`` builds
    it from ``shared["students"][name]`` and measures it on ``shared["data"]`` into one row, or into several
    (``rows``, each with its ``variant``) when one trial covers several settings; artifacts go to ``RUN/trials/<key>/``."""
    from slimray import families

    fam = families.get(family)
    recipe = fam.load("recipe")()
    cfg = fam.load("config").model_validate_json(config_json)
    student, candidate = candidates[key]
    rows = recipe.measure_rows(cfg, candidate, shared["students"][student], shared["data"], out_dir=Path(run_dir) / "trials" / key)
    if len(rows) == 1 and "variant" not in rows[0]:
        return {"key": key, "status": "ok", "student": student, **rows[0]}
    return {"key": key, "status": "ok", "student": student, "rows": rows}


def advise_with_recipe(error: str, key: str, *, family: str, candidates: dict[str, tuple[str, dict[str, Any]]]) -> str:
    """The family's ``Recipe.advice`` for a failed trial (a module-level function: it travels to the trials alone)."""
    from slimray import families

    return families.get(family).load("recipe")().advice(error, candidates[key][1])
