"""The one pipeline: distil -> search -> report (then ``slimray run`` serves the winner), for any model family.

``run_pipeline(cfg)`` looks up the config's family (``slimray.families``), asks its ``Stages`` to check what can
be checked before anything starts (the user's code and weights, cross-field constraints), opens the run folder
and Ray the same way for every family (``start_run``), then runs the family's stages in order with one console
line per stage (``until``: the stages up to one, e.g. ``slimray distill``). The stages (``pipelines/flow.py``, over
every family's ``Recipe``) use the shared engines: Ray Train through
``slimray.training.distill.run_training`` (the family's ``TrainTask``), Ray Tune through
``slimray.sweep.engine.run_tuner``, the shared winner selection (``slimray.sweep.select``) and the run-folder
conventions (``slimray.runs``: reused finished stages, atomic artifacts).
"""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Any

from slimray.runs import log, prepare_run_dir


def start_run(cfg: Any, *, out_dir: str | Path, address: str | None, fresh: bool) -> tuple[Path, float]:
    """The run folder (``OUT/<name>``, locked, with the config that made it) and Ray (embedded or
    ``address``); Ray's worker output linked into ``RUN/logs``. Returns (run folder, start time)."""
    import ray

    from slimray.console import link_ray_logs
    from slimray.runtime import init_ray

    t_start = time.perf_counter()
    run_dir = prepare_run_dir(cfg, Path(out_dir), fresh=fresh)
    log(f"run folder {run_dir}")
    init_ray(address)
    logs = link_ray_logs(run_dir)  # Ray's worker output stays there unless --verbose
    res = ray.cluster_resources()
    log(f"Ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs" + (f"; worker logs: {logs}" if logs else ""))
    return run_dir, t_start


class Stages(abc.ABC):
    """One family's stages on Ray. ``names`` lists the stage methods in order; each takes no argument, the
    last returns the report. State passes between stages on ``self``."""

    names: tuple[str, ...] = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.given_student: Path | None = None
        self.train_students = True
        self.resume = True

    def check(self) -> None:
        """What can fail before the run folder and Ray exist (the user's code, weights, config cross-checks)."""

    @abc.abstractmethod
    def open(self, run_dir: Path, t_start: float) -> None:
        """Open the run's data (Ray is up, the folder prepared)."""


def run_pipeline(cfg: Any, *, out_dir: str | Path = "runs", address: str | None = None, fresh: bool = False,
                 until: str | None = None, student: Path | None = None, train_students: bool = True,
                 resume: bool = True) -> dict[str, Any]:
    """Run every stage of ``cfg``'s family (finished stages of an earlier run of the same name are reused), or the
    stages up to and including ``until`` (e.g. ``distil``: ``slimray distill``); returns the last stage's answer (the
    report, also ``OUT/<name>/report.json``, when every stage ran). ``slimray sweep``'s options: ``student`` (an
    artifact folder searched instead of the run's students), ``train_students`` (False: only students already saved
    in the run are searched, or the teacher), ``resume`` (False: an earlier search experiment is an error)."""
    from slimray import families

    stages: Stages = families.get(cfg.family).load("stages")(cfg)
    stages.given_student, stages.train_students, stages.resume = student, train_students, resume
    names = stages.names
    if until is not None:
        if until not in names:
            raise ValueError(f"the {cfg.family} stages are {', '.join(names)}: no stage {until!r}")
        names = names[: names.index(until) + 1]
    stages.check()
    run_dir, t_start = start_run(cfg, out_dir=out_dir, address=address, fresh=fresh)
    stages.open(run_dir, t_start)
    report: Any = None
    for i, name in enumerate(names, 1):
        log(f"stage {i}/{len(stages.names)}: {name}")
        report = getattr(stages, name)()
    return report
