"""The shared stage sequence: every family runs distil -> search -> serve through its ``Recipe``
(``slimray.families.recipe``), with no stage code of its own.

Stages, one console line each: ``prepare`` (the family reads its data; training data it streams, ``stream_source``, is
opened here through Ray Data: one checking pass, val and test into memory), ``evaluate_teacher`` (the user's teacher,
kept as ``RUN/teacher`` when the family's trials load it, or one trained on labels on Ray Train), ``derive_students``
(the family's plans), ``distil`` (streamed data: the teacher's outputs first, a Ray Data batch-inference job whose
Parquet the Train workers read in shards; each student on the one Ray Train loop, distilled and, with the same budget,
on labels only; the search starts from whichever validates better and the report says what distillation gained or
lost; with a distillation space and a family's ``student_sweep`` hook, its Tune-over-Train sweep picks the starting
student), ``search`` (every candidate x starting student as one trial of the one Tune trainable,
``slimray.sweep.trials``, or Tune's random search / Optuna over the family's axes with ASHA reading a stepwise trial's
rows, ``Recipe.search_plan``; with ``include_teacher`` the teacher is a starting model too), ``finalists`` (the fastest
feasible candidates, the teacher, the starting students and the family's reference models for them (``timed_beside``)
rebuilt in this process, or in an actor of their own when the family says so (``time_apart``,
``slimray.sweep.timers``), and timed side by side in rounds: ``num_rounds`` at least, up to ``max_rounds`` until one
finalist leads two rounds running), ``winner`` (the one rule, ``slimray.sweep.select.choose``: fastest under the
family's quality constraint and ``admissible``, a lead inside the noise is a tie that the smaller model wins),
``export`` (the winner's artifact, ``Recipe.export``, and a sample request) and ``report`` (rows rendered with the
family's columns, the Pareto front plotted, the family's own sections). A rerun reuses the teacher, the students and
every finished trial. ``slimray sweep`` runs the same stages with no student trained (``train_students``), or from a
given artifact (``given_student``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from slimray.pipelines import Stages
from slimray.runs import log
from slimray.storage import write_json_atomic


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A Train run's per-epoch metrics (one JSON object a line); none when the student was reused from elsewhere."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FlowStages(Stages):
    names = ("prepare", "evaluate_teacher", "derive_students", "distil", "search", "finalists", "winner", "export", "report")

    def __init__(self, cfg: Any):
        from slimray import families

        super().__init__(cfg)
        self.family = families.get(cfg.family)
        self.recipe = self.family.load("recipe")()
        self.quality = self.recipe.quality_of(cfg)
        self.stream: Any = None  # the training split as a Ray Dataset, when the family streams it (Recipe.stream_source)
        self.train_stream: Any = None  # ... and with the teacher's outputs, once they are written (_teacher_outputs)
        # set by run_pipeline: given_student (`slimray sweep --student`: search this artifact instead of distilling),
        # train_students (False, `slimray sweep`: students already saved are searched, none trained), resume (False: an
        # earlier search experiment of this run is an error)
        self.sweep_summary: dict[str, Any] | None = None

    def check(self) -> None:
        self.recipe.check(self.cfg)

    def _sweeps_students(self) -> bool:
        """Whether the run asks for a distillation sweep (a family with a ``student_sweep`` hook, a config with a space)."""
        space = getattr(self.cfg, "distill_sweep", None)
        return space is not None and space.distill is not None and self.family.student_sweep is not None

    def open(self, run_dir: Path, t_start: float) -> None:
        self.run_dir, self.t_start = run_dir, t_start
        if self._sweeps_students():  # Ray is up: the distillation sweep's trials must fit before anything trains
            self.family.load("student_sweep_check")(self.cfg)

    # ------------------------------------------------------------------------------------------------ stages
    def prepare(self) -> None:
        self.data = self.recipe.prepare(self.cfg, self.run_dir)
        source = self.recipe.stream_source(self.cfg, self.data)
        if source is not None:  # training data through Ray Data: checked in one streaming pass, val/test read
            from slimray.data.files import open_stream

            opened = open_stream(source, self.run_dir)
            self.data = self.recipe.with_stream(self.cfg, self.data, opened, run_dir=self.run_dir)
            self.stream = opened.train

    def evaluate_teacher(self) -> None:
        teacher = given = self.recipe.teacher(self.cfg, self.data)
        path = self.run_dir / "teacher"
        if given is not None and self.recipe.keep_teacher:
            if not self.recipe.is_saved(path):
                self.recipe.save(path, given, candidate={}, cfg=self.cfg, data=self.data)
            given = None  # its folder is RUN/teacher, like a trained one's
        if teacher is None:
            if self.recipe.is_saved(path):
                teacher = self.recipe.load(path)
                log(f"teacher: reused {path}")
            else:
                plan, fields = self.recipe.teacher_job(self.cfg)
                teacher = self._train("teacher", plan, fields, self.recipe.train_data(self.cfg, self.data, None))
                self.recipe.save(path, teacher, candidate={}, cfg=self.cfg, data=self.data)
        self.teacher = teacher.eval()
        # the starting models' folders (a trial may load its model from there: Recipe.trial_input); the user's teacher has none
        self.folders: dict[str, Path | None] = {"teacher": path if given is None else None}
        self.teacher_row = {"key": "teacher", **self.recipe.evaluate(self.cfg, self.teacher, self.data)}
        log(f"teacher: {self._q(self.teacher_row)}, {self.teacher_row.get('params', 0):,} params")
        self.budget = self.recipe.budget(self.cfg, teacher=self.teacher_row)
        self.floor = self.quality.floor(self.recipe.reference(self.cfg, self.teacher_row), self.budget)

    def derive_students(self) -> None:
        self.plans = [] if self.given_student is not None else self.recipe.plan_students(self.cfg, self.teacher, data=self.data)
        for p in self.plans:
            log(f"student {p.name}: " + (p.note or json.dumps(p.spec)))
        self.reference_rows = []
        for name, (model, what) in self.recipe.references(self.cfg, self.teacher).items():
            row = {"key": name, "what": what, **self.recipe.evaluate(self.cfg, model.eval(), self.data)}
            self.reference_rows.append(row)
            log(f"{name} ({what}): {self._q(row)}")

    def distil(self) -> None:
        d = self.cfg.distill
        shared: dict[str, Any] | None = None  # the workers' arrays, made once a student is to be trained
        self.students: dict[str, Any] = {}
        self.student_rows: list[dict[str, Any]] = []
        self.bases: list[str] = []
        labels_only = getattr(d, "labels_only_baseline", False)  # a family without labels to train on has no such field
        if self.given_student is not None:  # `slimray sweep --student DIR`: that artifact is the one starting model
            name = self.given_student.name
            self.folders[name], self.students[name] = self.given_student, self.recipe.load(self.given_student)
            row = {"key": name, "plan": name, "distilled": None, "search_base": True,
                   **self.recipe.evaluate(self.cfg, self.students[name], self.data)}
            self.student_rows.append(row)
            self.bases.append(name)
            log(f"{name}: given ({self.given_student}), {self._q(row)}")
            return
        for plan in self.plans:
            rows = {}
            for distilled in (True, False) if labels_only else (True,):
                name = plan.name if distilled else f"{plan.name}-labels-only"
                path = self.run_dir / "students" / name
                self.folders[name] = path
                if self.recipe.is_saved(path):
                    model = self.recipe.load(path)
                    log(f"{name}: reused {path}")
                elif not self.train_students:
                    continue
                else:
                    if shared is None:
                        self._teacher_outputs()
                        shared = self.recipe.train_data(self.cfg, self.data, self.teacher)
                    model = self._train(name, plan, self.recipe.train_job(self.cfg, plan, distilled=distilled), shared,
                                        init_state=self.recipe.init_state(self.cfg, plan, self.teacher))
                    self.recipe.save(path, model, candidate={}, cfg=self.cfg, data=self.data)
                self.students[name] = model
                rows[distilled] = {"key": name, "plan": plan.name, "distilled": distilled,
                                   **self.recipe.evaluate(self.cfg, model, self.data)}
                self.student_rows.append(rows[distilled])
            if True not in rows:
                continue
            best = rows[True]
            if False in rows:
                gain = rows[True][self.quality.key] - rows[False][self.quality.key]
                rows[True]["kd_gain"] = gain if self.quality.higher_is_better else -gain
                if self.quality.better(rows[False][self.quality.key], rows[True][self.quality.key]):
                    best = rows[False]
                log(f"{plan.name}: distilled {self._q(rows[True])} vs labels only {self._q(rows[False])}: distillation "
                    f"{'gained' if rows[True]['kd_gain'] >= 0 else 'lost'} {abs(rows[True]['kd_gain']):.4g}; the search "
                    f"starts from the {'distilled' if best is rows[True] else 'labels-only'} student")
            best["search_base"] = True
            self.bases.append(best["key"])
        if self._sweeps_students():
            self._sweep_students()

    def _sweep_students(self) -> None:
        """The family's distillation sweep (Tune over Train): its best student, which competed with the recipe-settings
        student, is the one the search starts from."""
        self._teacher_outputs()
        init = None
        plan = self.plans[0] if self.plans else None
        state = self.recipe.init_state(self.cfg, plan, self.teacher) if plan is not None else None
        if state is not None:  # a derived student: every trial starts from the same pruned weights (saved once)
            init = self.run_dir / "students" / "student-init"
            if not self.recipe.is_saved(init):
                model = self.family.load("train_task").rebuild({"spec": self.recipe.job_spec(plan, self.data)}, state)
                self.recipe.save(init, model, candidate={}, cfg=self.cfg, data=self.data)
        default = self.folders.get(plan.name) if plan is not None else None
        best_dir, self.sweep_summary = self.family.load("student_sweep")(
            self.cfg, run_dir=self.run_dir, data=self.data, train_data=self.recipe.train_data(self.cfg, self.data, self.teacher),
            stream=self.train_stream, init_dir=init, default_dir=default, resume=self.resume)
        name = best_dir.name
        self.folders[name], self.students[name] = best_dir, self.recipe.load(best_dir)
        for r in self.student_rows:
            r.pop("search_base", None)
        row = {"key": name, "plan": name, "distilled": True, "search_base": True,
               **self.recipe.evaluate(self.cfg, self.students[name], self.data)}
        self.student_rows.append(row)
        self.bases = [name]
        log(f"{name}: the distillation sweep's pick ({self.sweep_summary['best']['key']}), {self._q(row)}; the search starts from it")

    def search(self) -> None:
        from slimray.sweep.trials import advise_with_recipe, measure_with_recipe, run_trials

        s = self.cfg.search
        settings = self.recipe.candidates(self.cfg)
        self.searched = self.bases + (["teacher"] if s.include_teacher else []) or ["teacher"]  # no student: the teacher
        self.students["teacher"] = self.teacher  # a search base like the students when include_teacher is set
        self.candidates = {f"{b}-{k}": (b, c) for b in self.searched for k, c in settings.items()}
        log(f"search: {len(self.candidates)} candidates ({len(settings)} settings x {len(self.searched)} starting model(s): "
            f"{', '.join(self.searched)})")
        self._teacher_outputs()  # a streamed family's search fine-tunes and calibrates on a sample of them
        measure = functools.partial(measure_with_recipe, family=self.family.name, config_json=self.cfg.model_dump_json(),
                                    run_dir=str(self.run_dir.resolve()), candidates=self.candidates, floor=self.floor)
        advice = functools.partial(advise_with_recipe, family=self.family.name, candidates=self.candidates)
        plan = self.recipe.search_plan(self.cfg)
        drawn: dict[str, Any] = {}
        if plan is not None:  # candidates drawn (random, Optuna) or stopped early (ASHA) by Tune over the family's axes
            from slimray.sweep.trials import Sampling, based_key

            scheduler = None
            if plan.asha is not None:
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(**plan.asha)
            drawn = dict(axes={"base": list(self.searched), **plan.axes}, key_of=functools.partial(based_key, key_of=plan.key_of),
                         sampling=Sampling(algorithm=plan.algorithm, num_samples=plan.num_samples, metric=plan.metric, mode=plan.mode,
                                           num_startup_trials=plan.num_startup_trials, seed=0, scheduler=scheduler))
            log(f"search: {plan.algorithm}" + (f", {plan.num_samples} trials drawn" if plan.algorithm != "grid" else "")
                + (", ASHA stops weak trials early" if scheduler is not None else ""))
        results = run_trials(
            run_dir=self.run_dir, keys=list(self.candidates), measure=measure, advice=advice, run_name=f"{self.family.name}-search",
            shared={"data": self.data, "students": {b: self._trial_input(b) for b in self.searched}},
            max_concurrent_trials=s.max_concurrent_trials or self._cpus(), use_tune=s.use_tune, cpus_per_trial=self.recipe.trial_cpus,
            reuse_actors=not self.recipe.fresh_trial_process, timing_lock=self.recipe.timing_lock, resume=self.resume, **drawn,
        )
        self.trials = []
        for k, r in results.items():
            base, settings = self.candidates[k]
            if "rows" not in r:
                if r.get("artifact"):  # the trial saved its model: the finalists and the winner are read from there
                    self.candidates[k] = (base, {**settings, "artifact": r["artifact"]})
                self.trials.append({"key": k, "student": base, **settings, **r})
                continue
            for row in r["rows"]:  # one trial, several settings (e.g. every quantization x sequence length)
                key, extra = f"{k}-{row['variant']}", row["settings"]
                self.candidates[key] = (base, {**settings, **extra})
                metrics = {m: v for m, v in row.items() if m not in ("variant", "settings")}
                self.trials.append({"key": key, "student": base, "status": "ok", **settings, **extra, **metrics})
        for note in self.recipe.notes(self.cfg):
            log(f"search: {note}")
        failed = [t for t in self.trials if t.get("status") != "ok"]
        for t in failed:
            log(f"trial {t['key']} failed: {str(t.get('error'))[:160]}; {t.get('advice') or ''}")
        if len(failed) == len(self.trials):
            from slimray.sweep.select import sweep_failure

            raise sweep_failure(self.trials)

    def finalists(self) -> None:
        s, q, speed = self.cfg.search, self.quality, self.recipe.speed_key
        done = [t for t in self.trials if t.get("status") == "ok"]
        if not self.recipe.time_in_trials:  # the trials left speed out: every candidate timed here, one at a time
            log(f"timing: {len(done)} candidates, one round, one at a time")
            models = {t["key"]: self.recipe.build(self.candidates[t["key"]][1], self.students[t["student"]], self.data) for t in done}
            quick = self.recipe.time(models, self.data, cfg=self.cfg, settings={k: self.candidates[k][1] for k in models})
            for t in done:
                t.update(self._speeds(quick[t["key"]]))
        identity = f"teacher-{self.recipe.identity}" if self.recipe.identity else None  # the teacher as it is, as a candidate
        # the teacher as the trials measured it (its identity trial), for constraints relative to the teacher's speed
        as_trial = next((t for t in done if t["key"] == identity), self.teacher_row)
        feasible = sorted((t for t in done if q.meets(t[q.key], self.floor)),
                          key=lambda t: -t[speed])
        ranked = [t for t in feasible if self.recipe.admissible(self.cfg, t, teacher=as_trial)][: s.num_finalists]
        if not ranked:  # nothing admissible in the trials' first pass: the fastest feasible, checked again side by side
            ranked = feasible[: s.num_finalists]
        if not ranked:  # nothing meets the constraint: the best quality is reported, not served silently as a winner
            sign = 1 if q.higher_is_better else -1
            ranked = [max(done, key=lambda t: sign * t[q.key])]
        plan: dict[str, tuple[str, dict[str, Any]]] = {"teacher": ("teacher", {})}
        plan.update({t["key"]: (t["student"], self.candidates[t["key"]][1]) for t in ranked if t["key"] != identity})
        for b in self.bases:  # the students the search started from, timed beside them
            plan.setdefault(b, (b, {}))
        self.beside: list[str] = []
        for t in ranked:  # the family's reference models for each finalist (e.g. the teacher in its runtime)
            for k, ref in self.recipe.timed_beside(self.cfg, t).items():
                if k in plan or k in self.beside or any(r["key"] == k for r in ranked):
                    continue
                self.beside.append(k)
                if k != identity:  # the teacher as it is is timed once, as "teacher"
                    plan[k] = ref
        settings = {k: st for k, (_, st) in plan.items()}
        models, apart = self._timing_models(plan)

        def plan_key(t: dict[str, Any]) -> str:
            return "teacher" if t["key"] == identity else t["key"]

        from slimray.sweep.select import rounds_summary, timed_rounds

        try:
            samples, num_rounds = timed_rounds(
                list(plan), lambda order: {k: self._speeds(v) for k, v in self._time_round(order, models, apart, settings).items()},
                num_rounds=s.num_rounds, most_rounds=s.most_rounds, leaders=list(dict.fromkeys(plan_key(t) for t in ranked)),
                speed_key=speed)
        finally:
            import ray

            for actor in apart.values():
                ray.kill(actor)
        if identity in {t["key"] for t in ranked} | set(self.beside):  # the teacher as it is, timed once under both names
            samples[identity], models[identity] = samples["teacher"], models["teacher"]

        self.rounds = {k: figs[speed] for k, figs in samples.items()}
        self.finalist_models = models

        def timed(row: dict[str, Any]) -> dict[str, Any]:
            figs = {fig: rounds_summary(xs)["median"] for fig, xs in samples[row["key"]].items()}
            return {**row, **figs, "speedup": figs[speed] / teacher_speed,
                    "rounds_spread": rounds_summary(samples[row["key"]][speed])["spread"]}

        teacher_speed = rounds_summary(self.rounds["teacher"])["median"]
        untimed_teacher = self.teacher_row
        self.teacher_row = timed(self.teacher_row)
        self.student_rows = [timed(r) if r["key"] in samples else r for r in self.student_rows]
        self.finalist_rows = [timed(t) for t in ranked]
        self.beside_rows = [timed({**untimed_teacher, "key": k, "student": "teacher"} if k == identity else
                                  {"key": k, "student": plan[k][0], **plan[k][1]}) for k in self.beside]
        for r in self.finalist_rows:
            log(f"finalist {r['key']}: {self._q(r)}, {r[speed]:.4g} {self.recipe.speed_label} "
                f"({r['speedup']:.2f}x the teacher, side by side, median of {num_rounds} rounds)")
        for r in self.beside_rows:
            log(f"beside them, {r['key']}: {r[speed]:.4g} {self.recipe.speed_label} ({r['speedup']:.2f}x the teacher)")

    def winner(self) -> None:
        from slimray.sweep.select import choose

        s = self.cfg.search
        pool = [r for r in self.finalist_rows if self.recipe.admissible(self.cfg, r, teacher=self.teacher_row)]
        w, ok, tied = choose(pool or self.finalist_rows, quality_key=self.quality.key, higher_is_better=self.quality.higher_is_better,
                             floor=self.floor, speed_key=self.recipe.speed_key, rounds=self.rounds, margin=s.noise_margin)
        assert w is not None
        ok = ok and bool(pool)
        self.winner_row, self.feasible, self.tied = w, ok, [t["key"] for t in tied]
        if ok:
            log(f"winner {w['key']}: {self._q(w)} (constraint: {self.quality.label} no worse than {self.floor:.4g}), "
                f"{w['speedup']:.2f}x the teacher" + (f"; tied within the noise with {', '.join(self.tied)}" if self.tied else ""))
        elif not pool and self.quality.meets(w[self.quality.key], self.floor):
            log(f"no finalist meets {self.recipe.admissible_rule(self.cfg) or 'the further constraint'} side by side; the "
                f"fastest within the quality budget is {w['key']} ({self._q(w)}, {w['speedup']:.2f}x the teacher), "
                "reported as not meeting it")
        else:
            log(f"no candidate meets the constraint ({self.quality.label} no worse than {self.floor:.4g}); the best one is "
                f"{w['key']} ({self._q(w)}): loosen the search's quality budget or distil longer")

    def export(self) -> None:
        key = self.winner_row["key"]
        self.recipe.export(self.run_dir / "winner", self.finalist_models.get(key), candidate=self.candidates[key][1],
                           base=self.students[self.candidates[key][0]], cfg=self.cfg, data=self.data)
        try:
            write_json_atomic(self.run_dir / "sample_request.json", self.recipe.sample_request(self.data))
        except NotImplementedError:
            pass
        log(f"winner artifact: {self.run_dir / 'winner'}")

    def report(self) -> dict[str, Any]:
        import time

        from slimray.report import rows_table, write_front_png
        from slimray.storage import write_text_atomic
        from slimray.sweep.select import non_dominated

        q, speed = self.quality.key, self.recipe.speed_key
        front = non_dominated(self.trials, goals={q: "max" if self.quality.higher_is_better else "min", speed: "max"})
        report = {
            "family": self.family.name, "name": self.cfg.name, "quality": {"key": q, "label": self.quality.label,
            "higher_is_better": self.quality.higher_is_better, "floor": self.floor, "budget": self.budget},
            "speed": {"key": speed, "label": self.recipe.speed_label},
            "teacher": self.teacher_row, "students": self.student_rows, "references": self.reference_rows,
            "search_bases": self.searched, "trials": self.trials, "finalists": self.finalist_rows, "beside": self.beside_rows,
            "rounds": self.rounds,
            "winner": {**self.winner_row, "meets_constraint": self.feasible, "tied_with": self.tied,
                       "size_ratio": self.teacher_row["size_bytes"] / self.winner_row["size_bytes"]
                       if self.teacher_row.get("size_bytes") and self.winner_row.get("size_bytes") else None},
            "distill_metrics": {r["key"]: read_jsonl(self.run_dir / "logs" / f"{r['key']}_metrics.jsonl") for r in self.student_rows},
            "notes": self.recipe.notes(self.cfg), **({"distill_sweep": self.sweep_summary} if self.sweep_summary else {}),
            "pareto_front": [t["key"] for t in front], "seconds": time.perf_counter() - self.t_start,
        }
        extra, extra_md = self.recipe.report_extras(self.cfg, {
            "run_dir": self.run_dir, "teacher": self.teacher_row, "winner": report["winner"], "finalists": self.finalist_rows,
            "beside": {r["key"]: r for r in self.beside_rows}, "students": self.student_rows, "meets_constraint": self.feasible,
            "trials": self.trials, "pareto_front": report["pareto_front"], "seconds": report["seconds"], "data": self.data,
            "distill_sweep": self.sweep_summary})
        report.update(extra)
        write_json_atomic(self.run_dir / "report.json", report)
        cols = list(self.recipe.columns)
        kd = [r for r in self.student_rows if "kd_gain" in r]
        rule = self.recipe.admissible_rule(self.cfg)
        md = [f"# {self.cfg.name}: {self.family.name}", "",
              f"Winner **{self.winner_row['key']}**: {self._q(self.winner_row)}, {self.winner_row['speedup']:.2f}x the teacher's "
              f"{self.recipe.speed_label} (side by side), constraint {self.quality.label} no worse than {self.floor:.4g}"
              + (f" and {rule}" if rule else "")
              + ("" if self.feasible else " **not met by any candidate**") + ".", "",
              "## Teacher and students", "", rows_table([self.teacher_row, *self.student_rows, *self.reference_rows], cols), ""]
        md += [f"- {r['key']}: {r['what']}" for r in self.reference_rows]
        md += [f"- {r['plan']}: distillation {'gained' if r['kd_gain'] >= 0 else 'lost'} {abs(r['kd_gain']):.4g} "
               f"{self.quality.label} against the same student on labels only" for r in kd]
        md += ["", f"Search started from: {', '.join(self.searched)}.", *[f"Note: {n}." for n in report["notes"]], "", "## Finalists (timed side by side)", "",
               rows_table([self.teacher_row, *self.finalist_rows, *self.beside_rows], cols), "",
               *(["Timed beside them: " + ", ".join(self.beside) + ".", ""] if self.beside else []),
               *extra_md, "## Every trial", "", rows_table(self.trials, cols),
               "", f"Pareto front ({self.quality.label} vs {self.recipe.speed_label}): {', '.join(report['pareto_front'])}", "",
               "![front](pareto.png)", ""]
        write_text_atomic(self.run_dir / "report.md", "\n".join(md))
        write_front_png(self.trials, front, self.run_dir / "pareto.png", quality_key=q, quality_label=self.quality.label,
                        speed_key=speed, speed_label=self.recipe.speed_label, winner=self.winner_row["key"], floor=self.floor)
        log(f"report: {self.run_dir / 'report.md'}")
        print("\n" + rows_table([self.teacher_row, *self.finalist_rows], cols), flush=True)
        return report

    # ------------------------------------------------------------------------------------------------ helpers
    def _cpus(self) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def _teacher_outputs(self) -> None:
        """A streamed family: the teacher's outputs over the training split, once, as a Ray Data batch-inference job
        written into the run folder (reused by a rerun); the Train workers read them in shards and the driver reads
        a sample back for the search (``Recipe.with_sample``)."""
        if self.stream is None or self.train_stream is not None:
            return
        from slimray.data.files import TEACHER_OUTPUTS, read_sample, write_teacher_outputs

        out = self.run_dir / TEACHER_OUTPUTS
        if not out.is_dir():
            log("teacher: computing its outputs over the training split once (Ray Data batch inference)")
            write_teacher_outputs(self.stream, teacher_dir=self.run_dir / "teacher", family=self.family.name, out_dir=out)
        else:
            log("teacher: reusing its saved outputs")
        import ray.data

        self.train_stream = ray.data.read_parquet(str(out))
        self.data = self.recipe.with_sample(self.cfg, self.data, read_sample(out, limit=self.recipe.sample_size(self.cfg, self.data)))

    def _trial_input(self, name: str) -> Any:
        return self.recipe.trial_input(name, self.students[name], folder=self.folders.get(name), data=self.data)

    def _timing_models(self, plan: dict[str, tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(models built here, actors of the candidates the family times apart), by key."""
        models: dict[str, Any] = {}
        apart: dict[str, Any] = {}
        data_ref = None
        for k, (base, settings) in plan.items():
            if not settings:  # a starting model as it is
                models[k] = self.students[base]
            elif self.recipe.time_apart(self.cfg, settings):
                import ray

                from slimray.sweep.timers import start_apart_timer

                data_ref = data_ref if data_ref is not None else ray.put(self.data)
                log(f"timing: building {k} in a process of its own")
                apart[k] = start_apart_timer(family=self.family.name, config_json=self.cfg.model_dump_json(), key=k,
                                             settings=settings, student=self._trial_input(base), data_ref=data_ref)
            else:
                models[k] = self.recipe.build(settings, self.students[base], self.data)
        return models, apart

    def _time_round(self, order: list[str], models: dict[str, Any], apart: dict[str, Any],
                    settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """One round in ``order``: the models here timed together by ``Recipe.time``, each apart one on its own in turn."""
        import ray

        out: dict[str, Any] = {}
        here: list[str] = []

        def flush() -> None:
            if here:
                out.update(self.recipe.time({k: models[k] for k in here}, self.data, cfg=self.cfg, settings=settings))
                here.clear()

        for k in order:
            if k in apart:
                flush()
                out[k] = ray.get(apart[k].time.remote())
            else:
                here.append(k)
        flush()
        return out

    def _q(self, row: dict[str, Any]) -> str:
        return f"{self.quality.label} {row[self.quality.key]:.4f}"

    def _speeds(self, value: Any) -> dict[str, float]:
        """A ``Recipe.time`` answer for one model as row figures (the speed alone, or the speed and more)."""
        return dict(value) if isinstance(value, dict) else {self.recipe.speed_key: float(value)}

    def _train(self, label: str, plan: Any, fields: dict[str, Any], shared: dict[str, Any], *, init_state: Any = None) -> Any:
        """One Ray Train run of the family's TrainTask (checkpoints under RUN/ray/<label>: a rerun resumes)."""
        from slimray.training.distill import TrainJob, run_training

        d = self.cfg.distill
        job = TrainJob(label=label, run_name=f"train-{label}", storage_path=str((self.run_dir / "ray").resolve()),
                       family=self.family.name, spec=self.recipe.job_spec(plan, self.data),
                       batch_size=d.batch_size, num_workers=d.num_workers, seed=d.seed,
                       metrics_path=str(self.run_dir / "logs" / f"{label}_metrics.jsonl"), **fields)
        # streamed data: the teacher's outputs once written; the teacher itself, trained before them, reads the raw rows
        stream = self.train_stream if self.train_stream is not None else self.stream
        model, metrics = run_training(job, shared, init_state=init_state, stream=stream)
        return model
