"""The one Tune trainable of the compression searches: one trial per candidate key, for every model family.

``run_trials`` runs ``measure(key, shared)`` (a module-level function: the family's build-and-measure of one
candidate) as one Ray Tune trial per key, on the shared engine (``slimray.sweep.engine.run_tuner``: resumable,
``max_concurrent_trials`` at once, one torch thread each). What every family gets the same way:

- the candidates: a grid over ``keys`` (every key once), or, with ``axes`` and a ``Sampling``, Tune's random search
  or Optuna's TPE over the axes (``num_samples`` draws; ``key_of(config)`` names the candidate a draw is), with a
  scheduler such as ASHA;
- steps: a ``measure`` that is a generator yields one payload per step (e.g. per fine-tune epoch); each is reported
  to Tune (its scalar fields are the metrics a searcher or scheduler reads) and saved as ``RUN/trials/<key>.partial.json``,
  so a trial the scheduler stops early keeps its last step as its result;
- the large inputs (``shared``: data, teacher outputs, evaluation sets) go to the object store once and each trial
  fetches them (``ray.get``), lists of arrays included; with ``timing_lock`` the trials share a lock
  (``shared["timing"](name)`` holds it) so that no two trials time a model at once on the same cores;
- a trial's result is written to ``RUN/trials/<key>.json`` atomically; a key whose file exists is never rerun (a
  rerun or a resumed sweep keeps finished trials); ``RUN/trials.log`` gets a line when a trial starts and ends;
- a failing trial writes ``RUN/trials/<key>.error.json`` (the error, a line of ``advice``, the traceback) and the
  search goes on; its result comes back as ``{"status": "error", "error": ..., "advice": ...}``;
- without Tune (``use_tune=False``, small searches and tests) the same function runs in the driver, in order.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray import tune

from slimray.storage import write_json_atomic

Measure = Callable[[str, dict[str, Any]], Any]
Advice = Callable[[str, str], str]


@dataclass(frozen=True)
class Sampling:
    """How the candidates are drawn: ``grid`` (every key once), ``random`` or ``optuna`` (``num_samples`` draws over
    ``axes``; Optuna's TPE on ``metric``/``mode``, one objective or several), and a Tune ``scheduler`` (ASHA) that reads
    the steps a generator ``measure`` reports."""

    algorithm: str = "grid"
    num_samples: int | None = None
    metric: str | list[str] = "reported"
    mode: str | list[str] = "max"
    num_startup_trials: int | None = None
    seed: int = 0
    scheduler: Any = None


def result_path(run_dir: str | Path, key: str) -> Path:
    return Path(run_dir) / "trials" / f"{key}.json"


def _partial_path(run_dir: str | Path, key: str) -> Path:
    return Path(run_dir) / "trials" / f"{key}.partial.json"


def trial_log(run_dir: str | Path, key: str, event: str) -> None:
    """One line per trial start/end in ``RUN/trials.log`` (progress at a glance; shows reruns)."""
    path = Path(run_dir) / "trials.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event} {key} pid={os.getpid()}\n")


def read_trial_log(run_dir: str | Path) -> list[tuple[str, str]]:
    """(event, key) pairs from ``RUN/trials.log``, in order."""
    path = Path(run_dir) / "trials.log"
    if not path.exists():
        return []
    return [(parts[1], parts[2]) for parts in (line.split() for line in path.read_text().splitlines()) if len(parts) >= 3]


class TimingHold:
    """``shared["timing"]``: ``with shared["timing"](name):`` holds the sweep's timing lock (nothing without one)."""

    def __init__(self, lock: Any = None):
        self.lock = lock

    def __call__(self, holder: str) -> contextlib.AbstractContextManager:
        if self.lock is None:
            return contextlib.nullcontext()
        from slimray.sweep.lock import hold

        return hold(self.lock, holder)


def _fetch(value: Any) -> Any:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _put(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, ray.ObjectRef)):
        return value
    return ray.put(value)


def _record_error(out: Path, err: BaseException, *, key: str, advice: Advice | None) -> None:
    message = repr(err)
    write_json_atomic(out.with_suffix(".error.json"), {
        "error": message, "advice": advice(message, key) if advice is not None else None, "traceback": traceback.format_exc(),
    })


def _report(payload: Any) -> dict[str, Any]:
    """What Tune sees of a payload: its scalar fields (a searcher's or scheduler's metrics, the console line's figures)."""
    metrics: dict[str, Any] = {"reported": 1}  # not Tune's "done", which ends a trial at its first step
    if isinstance(payload, dict):
        metrics.update({k: v for k, v in payload.items() if isinstance(v, (int, float, str, bool)) and k not in _TUNE_KEYS})
    return metrics


_TUNE_KEYS = {"done", "training_iteration", "time_total_s", "timestamp", "trial_id", "config"}  # what Tune sets itself


def _steps(run_dir: str | Path, key: str, result: Any, report: Callable[[dict[str, Any]], None] | None) -> None:
    """Save ``measure``'s answer as the key's result: its value, or a generator's last step (each step saved first
    as the partial result, then reported when ``report``: a scheduler may end the trial at any report)."""
    if not inspect.isgenerator(result):
        write_json_atomic(result_path(run_dir, key), result)
        if report is not None:
            report(_report(result))
        return
    payload: Any = None
    partial = _partial_path(run_dir, key)
    for payload in result:
        write_json_atomic(partial, payload)
        if report is not None:
            report(_report(payload))
    if payload is None:
        raise RuntimeError(f"trial {key}: the measure yielded no step")
    write_json_atomic(result_path(run_dir, key), payload)
    partial.unlink(missing_ok=True)


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The trainable: one key, its result file, or its error file."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    key = ctx["key_of"](config) if ctx["key_of"] is not None else config["key"]
    out = result_path(ctx["run_dir"], key)
    try:
        if out.exists():
            tune.report(_report(json.loads(out.read_text())))
            return
        trial_log(ctx["run_dir"], key, "start")
        shared = {k: _fetch(v) for k, v in ctx["shared"].items()} | {"timing": TimingHold(ctx["lock"])}
        _steps(ctx["run_dir"], key, ctx["measure"](key, shared), tune.report)
        trial_log(ctx["run_dir"], key, "end")
    except Exception as err:  # a failing trial is recorded, the search goes on
        _record_error(out, err, key=key, advice=ctx["advice"])
        raise


def read_result(run_dir: str | Path, key: str, *, advice: Advice | None = None) -> Any:
    """A key's result (a trial a scheduler stopped early: its last step), or its error as ``{"status": "error",
    "error", "advice"}`` (``trial did not finish`` when no file exists)."""
    for path in (result_path(run_dir, key), _partial_path(run_dir, key)):
        if path.exists():
            return json.loads(path.read_text())
    err = result_path(run_dir, key).with_suffix(".error.json")
    saved = json.loads(err.read_text()) if err.exists() else {"error": "trial did not finish"}
    msg = saved["error"]
    return {"status": "error", "error": msg,
            "advice": saved.get("advice") or (advice(msg, key) if advice is not None else None)}


def _tried(run_dir: Path, key: str) -> bool:
    return any(p.exists() for p in (result_path(run_dir, key), _partial_path(run_dir, key),
                                    result_path(run_dir, key).with_suffix(".error.json")))


def run_trials(
    *, run_dir: str | Path, keys: list[str], measure: Measure, shared: dict[str, Any], run_name: str,
    max_concurrent_trials: int, advice: Advice | None = None, use_tune: bool = True,
    cpus_per_trial: float = 1.0, reuse_actors: bool = True, describe: Callable[[str], str] | None = None,
    axes: dict[str, list[Any]] | None = None, key_of: Callable[[dict[str, Any]], str] | None = None,
    sampling: Sampling | None = None, timing_lock: bool = False, resume: bool = True,
) -> dict[str, Any]:
    """Every key's result (``measure``'s JSON payload, or an error dict), in ``keys`` order; with a random or Optuna
    ``sampling``, the keys drawn. ``axes`` and ``key_of``: the trial config's fields (Tune samples each) and the key a
    config names (default: one ``key`` field over ``keys``). ``reuse_actors=False`` gives each trial a fresh process
    (an engine that patches its process, such as vLLM's). Without ``resume`` an earlier experiment of the same name
    is an error (``FileExistsError``) rather than continued."""
    run_dir = Path(run_dir)
    sampling = sampling or Sampling()
    sampled = sampling.algorithm != "grid"
    todo = [k for k in keys if not result_path(run_dir, k).exists()]
    if todo and use_tune:
        from slimray.sweep.engine import make_tune_config, run_tuner
        from slimray.sweep.lock import TimingLock

        lock = TimingLock.remote() if timing_lock else None
        ctx = {"run_dir": str(run_dir), "measure": measure, "advice": advice, "key_of": key_of if axes else None,
               "shared": {k: _put(v) for k, v in shared.items()}, "lock": lock}
        tune_config = make_tune_config(
            algorithm=sampling.algorithm, num_samples=sampling.num_samples, max_concurrent_trials=max_concurrent_trials,
            metric=sampling.metric, mode=sampling.mode, seed=sampling.seed, num_startup_trials=sampling.num_startup_trials,
            scheduler=sampling.scheduler)
        tune_config.reuse_actors = reuse_actors
        if axes is None:
            space = {"key": tune.grid_search(todo)}
            name_of = lambda c: c["key"]  # noqa: E731
        else:
            pick = tune.choice if sampled else tune.grid_search
            space = {a: pick(list(vs)) for a, vs in axes.items()}
            name_of = key_of
        try:
            run_tuner(
                tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": cpus_per_trial}),
                param_space=space, tune_config=tune_config,
                run_name=run_name, storage_path=str((run_dir / "ray").resolve()), resume=resume,
                describe=lambda c: describe(name_of(c)) if describe else name_of(c),
            )
        finally:
            if lock is not None:
                ray.kill(lock)
    elif todo:
        local = {k: _fetch(v) for k, v in shared.items()} | {"timing": TimingHold()}  # as a trial sees them
        for key in todo:
            out = result_path(run_dir, key)
            try:
                trial_log(run_dir, key, "start")
                _steps(run_dir, key, measure(key, local), None)
                trial_log(run_dir, key, "end")
            except Exception as err:  # as in a trial: recorded, the search goes on
                _record_error(out, err, key=key, advice=advice)
    chosen = [k for k in keys if _tried(run_dir, k)] if sampled else keys
    return {k: read_result(run_dir, k, advice=advice) for k in chosen}


def based_key(config: dict[str, Any], *, key_of: Callable[[dict[str, Any]], str]) -> str:
    """The key of a drawn config over a family's axes plus ``base`` (the starting model): ``<base>-<family key>``."""
    return f"{config['base']}-{key_of(config)}"


def measure_with_recipe(key: str, shared: dict[str, Any], *, family: str, config_json: str, run_dir: str,
                        candidates: dict[str, tuple[str, dict[str, Any]]], floor: float | None = None) -> Any:
    """A family's candidate as a trial: ``candidates[key]`` = (student name, settings); the family's ``Recipe`` builds
    it from ``shared["students"][name]`` and measures it on ``shared["data"]`` into one row, or into several
    (``rows``, each with its ``variant``) when one trial covers several settings, or, for a stepwise family, into a
    row per step (a generator: each step saved and reported); artifacts go to ``RUN/trials/<key>/``."""
    from slimray import families

    fam = families.get(family)
    recipe = fam.load("recipe")()
    cfg = fam.load("config").model_validate_json(config_json)
    student, candidate = candidates[key]
    if recipe.stepwise:
        steps = recipe.measure_steps(cfg, candidate, shared["students"][student], shared["data"], out_dir=Path(run_dir) / "trials" / key,
                                     timing=shared["timing"], floor=floor)
        return ({"key": key, "student": student, **row} for row in steps)
    rows = recipe.measure_rows(cfg, candidate, shared["students"][student], shared["data"], out_dir=Path(run_dir) / "trials" / key)
    if len(rows) == 1 and "variant" not in rows[0]:
        return {"key": key, "status": "ok", "student": student, **rows[0]}
    return {"key": key, "status": "ok", "student": student, "rows": rows}


def advise_with_recipe(error: str, key: str, *, family: str, candidates: dict[str, tuple[str, dict[str, Any]]]) -> str:
    """The family's ``Recipe.advice`` for a failed trial (a module-level function: it travels to the trials alone)."""
    from slimray import families

    return families.get(family).load("recipe")().advice(error, candidates[key][1])
