"""The machinery both sweeps share: Tune config (grid / random / Optuna, ASHA), run-or-resume, resource
planning, and clean-up of Ray Train placement groups left by trials that Tune stopped.

The compression searches of every family (``trials.py``: one trial per candidate, a grid or a sampled search
over its axes) and the classifier's distillation sweep (``distill_search.py``: one trial = one Ray Train run)
differ only in their trainable, their parameter space and their metric; ``run_tuner`` runs either, and resumes it
when its experiment folder exists. The console gets one line per trial start and end (``TrialLines``); Tune's own tables only
with ``--verbose``. A stop signal during ``fit`` lets Tune save the experiment, then raises
``slimray.console.Interrupted`` (see ``slimray.console``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from slimray import console
from slimray.schema import ClusterTooSmallError

DRIVER_MEMORY_BYTES = 256 * 2**20  # what a Train-driver trial reserves: it holds no CPU (its workers do)


def make_tune_config(
    *,
    algorithm: str,
    num_samples: int | None,
    max_concurrent_trials: int,
    metric: str | list[str],
    mode: str | list[str],
    seed: int = 0,
    num_startup_trials: int | None = None,
    scheduler: ASHAScheduler | None = None,
) -> tune.TuneConfig:
    """grid: every point once; random: ``num_samples`` draws; optuna: TPE on ``metric`` (one or several)."""
    kwargs: dict[str, Any] = {"max_concurrent_trials": max_concurrent_trials}
    if algorithm != "grid":
        kwargs["num_samples"] = num_samples
    if algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if num_startup_trials is None:
            kwargs["search_alg"] = OptunaSearch(metric=metric, mode=mode, seed=seed)
        else:
            import optuna

            sampler = optuna.samplers.TPESampler(n_startup_trials=num_startup_trials, seed=seed)
            kwargs["search_alg"] = OptunaSearch(metric=metric, mode=mode, sampler=sampler)
    if scheduler is not None:
        kwargs["scheduler"] = scheduler
    return tune.TuneConfig(**kwargs)


class ExplainedASHA(ASHAScheduler):
    """ASHA that writes down why it stopped a trial: the epoch, the trial's value and the rung's cutoff
    (one JSON line per stop in ``stops_path``, so the record survives a resumed sweep)."""

    def __init__(self, *, stops_path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._stops_path = stops_path

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        cutoff = self._cutoff(trial, result)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and self._time_attr in result and result[self._time_attr] < self._max_t:
            t = result[self._time_attr]
            entry = {"trial_id": trial.trial_id, self._time_attr: t, self._metric: result.get(self._metric),
                     "cutoff": cutoff, "mode": self._mode, "time": time.time()}
            path = Path(self._stops_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(entry, default=float) + "\n")
        return action

    def _cutoff(self, trial, result: dict) -> float | None:
        """The cutoff of the rung this result is judged at (the highest milestone it reaches and has not been
        recorded at, as ASHA decides), taken before the result itself is recorded there."""
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None or self._time_attr not in result:
            return None
        for milestone, recorded in bracket._rungs:  # highest milestone first
            if result[self._time_attr] >= milestone and trial.trial_id not in recorded:
                c = bracket.cutoff(recorded)
                return None if c is None else float(c) * (1 if self._mode == "max" else -1)
        return None


def read_stops(path: str | Path) -> dict[str, dict[str, Any]]:
    """trial_id -> the ASHA stop record (the last one if a resumed sweep stopped it again)."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            out[e["trial_id"]] = e
    return out


class PlacementGroupReaper(tune.Callback):
    """Removes the placement group of a trial's Ray Train worker group when Tune ends the trial.

    When a scheduler stops a trial, Tune ends the trial's actor; the Train controller it owned dies with it,
    but the workers' placement group belongs to the job and would keep its CPUs reserved (Ray Train's own
    cleaner finds the cluster through RAY_ADDRESS, which an embedded Ray does not set). Workers report the
    group's id as ``placement_group``; a finished run has removed its group already, so removing it again is
    a no-op.
    """

    def __init__(self) -> None:
        self._groups: dict[str, str] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        pg = result.get("placement_group")
        if pg:
            self._groups[trial.trial_id] = pg

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reap(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reap(trial.trial_id)

    def _reap(self, trial_id: str) -> None:
        pg_hex = self._groups.pop(trial_id, None)
        if not pg_hex:
            return
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
        except Exception:  # already removed by the finished run
            pass


class TrialLines(tune.Callback):
    """One console line when a trial starts and when it ends (its key, status and headline metric)."""

    def __init__(self, describe: Callable[[dict[str, Any]], str] | None = None, *, what: str = "trial") -> None:
        self._describe = describe or (lambda config: " ".join(f"{k}={v}" for k, v in sorted(config.items())))
        self._what = what

    def _name(self, trial) -> str:
        try:
            return self._describe(trial.config)
        except Exception:  # noqa: BLE001 - a progress line must never fail the sweep
            return trial.trial_id

    def on_trial_start(self, iteration, trials, trial, **info):
        _log(f"{self._what} {self._name(trial)}: started")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if r.get("status") == "error":
            _log(f"{self._what} {self._name(trial)}: failed: {str(r.get('error', '')).splitlines()[0][:200]}")
            return
        parts = []
        if isinstance(r.get("accuracy"), (int, float)):
            parts.append(f"{r['accuracy']:.2f}% val")
        for k in sorted((k for k in r if k.startswith("latency_ms_b")), key=lambda k: int(k.removeprefix("latency_ms_b"))):
            parts.append(f"{r[k]:.3g} ms at batch {k.removeprefix('latency_ms_b')}")
        _log(f"{self._what} {self._name(trial)}: done" + (f" ({', '.join(parts)})" if parts else ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        _log(f"{self._what} {self._name(trial)}: failed (see the trial's error in the report and RUN/logs/)")


def _log(msg: str) -> None:
    from slimray.runs import log

    log(msg)


def plan_train_trials(
    *, num_trials: int, num_workers: int, cpus_per_worker: float, use_gpu: bool, max_concurrent_trials: int | None, what: str
) -> int:
    """How many Train-in-Tune trials run at once: each is a driver (no CPU, ``DRIVER_MEMORY_BYTES``) plus
    ``num_workers`` workers. Raises ClusterTooSmallError, naming the resources and what to lower, when one
    trial (or the asked concurrency) cannot fit the cluster, instead of letting trials wait forever."""
    total = ray.cluster_resources()
    cpus, gpus, memory = total.get("CPU", 0.0), total.get("GPU", 0.0), total.get("memory", 0.0)
    need_cpu = num_workers * cpus_per_worker
    need_gpu = num_workers if use_gpu else 0
    per_trial = f"{num_workers} worker(s) x {cpus_per_worker:g} CPU = {need_cpu:g} CPU" + (f" + {need_gpu} GPU" if need_gpu else "")
    if need_cpu > cpus + 1e-9:
        raise ClusterTooSmallError(
            f"{what}: one trial needs its Train driver (0 CPU) + {per_trial}, but the cluster has {cpus:g} CPU; "
            f"lower search.num_workers (workers per trial) or search.cpus_per_worker, or add nodes"
        )
    if need_gpu > gpus:
        raise ClusterTooSmallError(
            f"{what}: one trial needs {need_gpu} GPU ({num_workers} workers with use_gpu), the cluster has {gpus:g}; "
            "lower search.num_workers or set search.use_gpu: false"
        )
    fit = math.floor((cpus + 1e-9) / need_cpu)
    if need_gpu:
        fit = min(fit, math.floor(gpus / need_gpu))
    if memory:
        fit = min(fit, max(1, int(memory // DRIVER_MEMORY_BYTES)))
    if max_concurrent_trials is not None:
        if max_concurrent_trials > fit:
            raise ClusterTooSmallError(
                f"{what}: max_concurrent_trials {max_concurrent_trials} x ({per_trial}) = "
                f"{max_concurrent_trials * need_cpu:g} CPU, but the cluster has {cpus:g} CPU"
                + (f" and {gpus:g} GPU" if need_gpu else "") + f"; lower search.max_concurrent_trials to {fit} or fewer"
            )
        return max_concurrent_trials
    return max(1, min(fit, num_trials))


def run_tuner(
    trainable: Callable,
    *,
    param_space: dict[str, Any],
    tune_config: tune.TuneConfig,
    run_name: str,
    storage_path: str,
    resume: bool,
    callbacks: list[tune.Callback] | None = None,
    describe: Callable[[dict[str, Any]], str] | None = None,
) -> tune.ResultGrid:
    """Run the experiment ``storage_path/run_name``, or continue it if it exists and ``resume`` is set
    (finished trials are kept; unfinished and errored ones run again). Without ``resume`` an existing
    experiment is an error rather than silently reused. ``describe(config)`` names a trial on the console."""
    path = os.path.join(storage_path, run_name)
    callbacks = [*(callbacks or []), TrialLines(describe)]
    if not console.verbose():
        # Tune's new console output prints its experiment table whatever `verbose` says: use the classic one,
        # which verbose=0 silences; and no "operation took 0.5 s" warnings on a busy 2-core machine
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
        # Tune's own warnings (its Python-API resume hint on a stop signal, metrics of trials it stopped) go to
        # RUN/logs/tune.log: the console gets TrialLines and slimray's resume command
        console.divert_logger("ray.tune", Path(storage_path).parent / "logs" / "tune.log")
    if tune.Tuner.can_restore(path):
        if not resume:
            raise FileExistsError(f"a sweep already exists at {path}: pass --resume to continue it, or use another run name")
        _log(f"sweep: resuming {path}: finished trials are kept")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        # a restored experiment keeps the RunConfig it was created with: give it this process's callbacks
        local = getattr(tuner, "_local_tuner", None)  # noqa: SLF001 - Ray 2.60 has no public setter
        if local is not None:
            local._run_config.callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=run_name, storage_path=storage_path, verbose=1 if console.verbose() else 0, callbacks=callbacks,
            ),
        )
    with console.tune_running():  # a stop signal: Tune saves the experiment, then Interrupted is raised
        return tuner.fit()
