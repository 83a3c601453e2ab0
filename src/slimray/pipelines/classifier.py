"""The whole pipeline: teacher -> distilled student (Ray Train) -> compression sweep (Ray Tune) -> winner.

Every stage writes its result into ``OUT/<name>/`` atomically; a rerun with the same name reuses finished
stages, and Ray Train / Tune resume their own unfinished runs from checkpoints stored there.
Serving is left to the caller (``slimray.cli``), so the pipeline is usable headless.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimray.families.classifier.artifacts import (
    ArtifactSpec, artifact_bytes, copy_artifact, load_artifact, load_runnable, load_spec, save_artifact,
)
from slimray.compress.measure import accuracy, compare_latency, predict_logits, torch_threads
from slimray.config import PipelineConfig
from slimray.data import load_dataset
from slimray.data.sample import write_test_sample
from slimray.evaluation import load_metric
from slimray.families.classifier import load_ccexam_mnist_teacher
from slimray.families.classifier.spec import InputSpec, ModuleSpec, count_params, spec_from_model
from slimray.families.classifier.report import headline_table, write_report_files
from slimray.pipelines import Stages
from slimray.runs import log
from slimray.storage import reusable, write_json_atomic
from slimray.families.classifier.derive import derive
from slimray.families.classifier.search import in_runtime, trial_key
from slimray.families.classifier.teachers import check_takes_examples, load_user_teacher
from slimray.sweep.search import SweepContext, run_sweep
from slimray.families.classifier.explain import most_failed
from slimray.sweep.select import choose, feasible, pareto_front, rank_fastest, sweep_failure, timed_rounds
from slimray.training.classifier_data import TrainData, check_teacher_layer, classifier_job
from slimray.training.distill import run_training


def _teacher(run: Run, data: TrainData) -> tuple[torch.nn.Module, ArtifactSpec]:
    cfg, run_dir = run.cfg, run.run_dir
    path = run_dir / "teacher"
    if reusable(path, spec_cls=ArtifactSpec, log=log):  # verified against its sha256s; a damaged one is rebuilt
        log("teacher: reusing the saved teacher")
        return load_artifact(path)
    if cfg.teacher.is_users:
        spec = cfg.teacher.module_spec()
        log(f"teacher: {spec.factory if cfg.teacher.source == 'module' else cfg.teacher.path} with weights {cfg.teacher.weights_file()}")
        model = run.user_teacher if run.user_teacher is not None else load_user_teacher(cfg)
    elif cfg.teacher.source == "ccexam_mnist":
        log("teacher: the pretrained ccexam MNIST CNN")
        model, spec = load_ccexam_mnist_teacher()
    else:
        log(f"teacher: training {cfg.teacher.model.conv_channels if cfg.teacher.model.kind == 'cnn' else cfg.teacher.model.hidden} on labels, {cfg.distill.num_workers} Ray Train workers")
        spec = cfg.teacher.model
        job = classifier_job(
            label="teacher", run_name=f"{cfg.name}-teacher", storage_path=str(run_dir / "ray"), spec=spec.model_dump(),
            epochs=cfg.teacher.epochs, batch_size=cfg.distill.batch_size, lr=cfg.teacher.lr, alpha=0.0,
            num_workers=cfg.distill.num_workers, use_gpu=cfg.distill.use_gpu, seed=cfg.distill.seed,
            max_failures=cfg.distill.max_failures, metrics_path=str(run_dir / "teacher_metrics.jsonl"),
            strategy=cfg.distill.strategy, placement_strategy=cfg.distill.placement_strategy, input_spec=run.input.model_dump(),
        )
        model, _ = run_training(job, data)
    art = ArtifactSpec(name="teacher", model=spec, input=run.input)
    save_artifact(path, model, art)
    return load_artifact(path)


def _teacher_logits(teacher: torch.nn.Module, x_train: torch.Tensor, run_dir: Path) -> np.ndarray:
    path = run_dir / "teacher_logits.safetensors"
    if path.exists():
        try:
            return load_file(str(path))["logits"].numpy()
        except (SafetensorError, KeyError, OSError) as err:  # truncated or damaged: recompute it alone
            log(f"teacher: {path} is damaged ({type(err).__name__}): recomputing it")
    log(f"teacher: computing logits for {len(x_train)} training examples once (shared with every worker)")
    with torch_threads(os.cpu_count() or 1):
        logits = predict_logits(teacher, x_train, batch_size=512).contiguous()
    tmp = path.with_name(".teacher_logits.tmp")
    save_file({"logits": logits}, str(tmp))
    tmp.replace(path)
    return logits.numpy()


def derive_student(run: Run, teacher: torch.nn.Module, teacher_spec: ArtifactSpec) -> tuple[torch.nn.Module, ArtifactSpec]:
    """The student derived from the teacher by structured pruning to ``distill.derive.keep`` of its size
    (saved once as ``RUN/student_init``: the distillation runs start from these weights)."""
    path = run.run_dir / "student_init"
    if reusable(path, spec_cls=ArtifactSpec, log=log):
        return load_artifact(path)
    dv = run.cfg.distill.derive
    assert dv is not None
    x, y = run.split["val"] if run.split.get("train") is None else run.split["train"]
    pruned, info, note = derive(teacher, x, y, dv)
    log(f"student: derived from the {note}; {count_params(teacher)} -> {count_params(pruned)} params")
    model_spec = spec_from_model(pruned, teacher_spec.model)
    if isinstance(model_spec, ModuleSpec):
        model_spec = model_spec.model_copy(update={"note": note})
    spec = ArtifactSpec(name="student_init", model=model_spec, input=run.input, metadata={"derived": info})
    save_artifact(path, pruned.eval(), spec)
    return load_artifact(path)


def _student(run: Run, data: TrainData, *, distilled: bool, init: tuple[torch.nn.Module, ArtifactSpec] | None) -> tuple[torch.nn.Module, ArtifactSpec]:
    cfg, run_dir = run.cfg, run.run_dir
    name = "student" if distilled else "student_labels_only"
    path = run_dir / name
    if reusable(path, spec_cls=ArtifactSpec, log=log):
        log(f"{name}: reusing the saved model")
        return load_artifact(path)
    d = cfg.distill
    kd = distilled and d.loss != "labels"
    how = (f"KD on {d.loss} (T={d.temperature}, alpha={d.alpha}, teacher {d.teacher_outputs})" if kd
           else "labels only" + ("" if distilled else " (same budget)"))
    src = "Ray Data shards" if data.train_stream is not None else "the object store"
    log(f"{name}: {d.epochs} epochs, {how}, {d.num_workers} Ray Train workers ({d.strategy}, {d.placement_strategy}) reading {src}")
    model_spec = init[1].model if init is not None else d.student
    job = classifier_job(
        label=name, run_name=f"{cfg.name}-{name}", storage_path=str(run_dir / "ray"), spec=model_spec.model_dump(),
        epochs=d.epochs, batch_size=d.batch_size, lr=d.lr, lr_schedule=d.lr_schedule, weight_decay=d.weight_decay, temperature=d.temperature,
        alpha=d.alpha if kd else 0.0, num_workers=d.num_workers, use_gpu=d.use_gpu, seed=d.seed,
        max_failures=d.max_failures, metrics_path=str(run_dir / f"{name}_metrics.jsonl"),
        strategy=d.strategy, placement_strategy=d.placement_strategy, teacher_outputs=d.teacher_outputs,
        teacher_dir=str(run_dir / "teacher"), teacher_half_precision=d.teacher_half_precision,
        feature_kd=d.feature_kd if kd and d.loss == "features" else None, input_spec=run.input.model_dump(),
    )
    init_state = {k: v.detach().clone() for k, v in init[0].state_dict().items()} if init is not None else None
    model, _ = run_training(job, data, init_state=init_state)
    save_artifact(path, model, ArtifactSpec(name=name, model=model_spec, input=run.input, metadata=init[1].metadata if init else {}))
    return load_artifact(path)


@dataclass
class Run:
    """An opened run: its config, folder, data and start time. ``split`` holds normalised tensors (val, test,
    and train for built-in data; for data on disk, train is a sample of the teacher outputs, set by the
    teacher stage), ``refs`` their object-store references, ``stream`` the training files as a Ray Dataset."""

    cfg: PipelineConfig
    run_dir: Path
    name: str
    input: InputSpec
    num_classes: int
    split: dict[str, tuple[torch.Tensor, torch.Tensor] | None]
    refs: dict[str, Any]
    t_start: float
    stream: Any = None  # ray.data.Dataset of raw (x, y) for data on disk
    user_teacher: torch.nn.Module | None = None  # the user's teacher as loaded (and checked) when the run opened

    @property
    def labels_data(self) -> TrainData:
        return TrainData(**self.refs, train_stream=self.stream)


def check_config(cfg: PipelineConfig) -> torch.nn.Module | None:
    """Before the run folder and Ray: the user's code and weights (the loaded teacher is returned, and kept for
    the teacher stage)."""
    return load_user_teacher(cfg) if cfg.teacher.is_users else None


def open_run(cfg: PipelineConfig, *, out_dir: str | Path = "runs", address: str | None = None, fresh: bool = False) -> Run:
    """Check the config, prepare the run folder, start or reach Ray, open the data (``open_data``)."""
    from slimray.pipelines import start_run

    user_teacher = check_config(cfg)
    run_dir, t_start = start_run(cfg, out_dir=out_dir, address=address, fresh=fresh)
    return open_data(cfg, run_dir, t_start, user_teacher=user_teacher)


def open_data(cfg: PipelineConfig, run_dir: Path, t_start: float, *, user_teacher: torch.nn.Module | None) -> Run:
    """Open the data (built-in: loaded once and shared through the object store; files: checked in one
    streaming pass, val/test read, train kept as a Ray Dataset)."""
    if cfg.distill_sweep is not None and cfg.distill_sweep.distill is not None:  # fail before training anything
        from slimray.sweep.engine import plan_train_trials

        s = cfg.distill_sweep.search
        plan_train_trials(
            num_trials=cfg.distill_sweep.num_trials, num_workers=s.num_workers, cpus_per_worker=s.cpus_per_worker,
            use_gpu=s.use_gpu, max_concurrent_trials=s.max_concurrent_trials, what="distillation sweep",
        )
    streamed = cfg.data.source == "files" or cfg.data.stream
    if streamed:
        from slimray.data.files import builtin_as_files, load_files_data

        files_cfg = cfg.data
        if cfg.data.source == "builtin":  # the built-in dataset as a files source (Parquet in the run folder)
            files_cfg = builtin_as_files(load_dataset(cfg.data.name, seed=cfg.data.seed), run_dir / "data")
        log(f"data: reading {files_cfg.train} with Ray Data (one checking pass over the training split)")
        fd = load_files_data(files_cfg)
        if user_teacher is not None:
            check_takes_examples(user_teacher, cfg, fd.input.shape)
        norm = lambda s: (fd.input.normalize(torch.from_numpy(s.x)), torch.from_numpy(s.y))  # noqa: E731
        split = {"train": None, "val": norm(fd.val), "test": norm(fd.test)}
        name, input_spec, num_classes, stream, n_train = fd.name, fd.input, fd.num_classes, fd.train, fd.num_train
        write_test_sample(run_dir, fd.test.x, fd.test.y)
        refs = dict(x_train=None, y_train=None)
    else:
        ds = load_dataset(cfg.data.name, seed=cfg.data.seed)
        if user_teacher is not None:
            check_takes_examples(user_teacher, cfg, ds.input.shape)
        split = {k: ds.normalized(k) for k in ("train", "val", "test")}
        name, input_spec, num_classes, stream, n_train = ds.name, ds.input, ds.num_classes, None, len(ds.train)
        write_test_sample(run_dir, ds.test.x, ds.test.y)
        refs = dict(x_train=ray.put(split["train"][0].numpy()), y_train=ray.put(split["train"][1].numpy()))
    log(f"data {name}: {n_train} train / {len(split['val'][0])} val / {len(split['test'][0])} test, "
        f"{num_classes} classes, examples {input_spec.shape}")
    (x_va, y_va) = split["val"]
    refs.update(x_val=ray.put(x_va.numpy()), y_val=ray.put(y_va.numpy()))
    return Run(cfg, run_dir, name, input_spec, num_classes, split, refs, t_start, stream=stream, user_teacher=user_teacher)


@dataclass
class Distilled:
    teacher: torch.nn.Module
    logits_ref: Any
    student: torch.nn.Module | None = None
    baseline: torch.nn.Module | None = None
    default_student: torch.nn.Module | None = None  # the recipe-settings student, when a sweep picked another


def teacher_stage(run: Run) -> Distilled:
    teacher, _ = _teacher(run, run.labels_data)
    if run.stream is None:
        logits_ref = ray.put(_teacher_logits(teacher, run.split["train"][0], run.run_dir))
        return Distilled(teacher=teacher, logits_ref=logits_ref)
    # data on disk: the teacher's outputs are a Ray Data batch-inference job written into the run folder once
    from slimray.data.files import TEACHER_OUTPUTS, read_sample, rows_within_budget, write_teacher_outputs

    out = run.run_dir / TEACHER_OUTPUTS
    if not out.is_dir():
        log("teacher: computing its outputs over the training split once (Ray Data batch inference)")
        write_teacher_outputs(run.stream, teacher_dir=run.run_dir / "teacher", input_spec=run.input, out_dir=out)
    else:
        log("teacher: reusing its saved outputs")
    run.stream = ray.data.read_parquet(str(out))
    sample = read_sample(out, limit=rows_within_budget(run.input.shape, run.cfg.search.finetune_examples))
    x = run.input.normalize(torch.from_numpy(sample["x"]))
    run.split["train"] = (x, torch.from_numpy(sample["y"]))
    run.refs.update(x_train=ray.put(x.numpy()), y_train=ray.put(sample["y"]))
    return Distilled(teacher=teacher, logits_ref=ray.put(sample["logits"]))


def distill_stage(run: Run) -> Distilled:
    """Teacher (loaded or trained), teacher outputs, the distilled student and the labels-only baseline."""
    check_teacher_layer(run.cfg)  # a bad feature_kd.teacher_layer fails before the teacher is trained
    d = teacher_stage(run)
    init = derive_student(run, d.teacher, load_spec(run.run_dir / "teacher")) if run.cfg.distill.student is None else None
    kd_data = TrainData(**run.refs, teacher_logits=d.logits_ref, train_stream=run.stream)
    d.student, _ = _student(run, kd_data, distilled=True, init=init)
    if run.cfg.distill.labels_only_baseline:
        d.baseline = _student(run, run.labels_data, distilled=False, init=init)[0]
    return d


class ClassifierStages(Stages):
    """The classifier family on the one pipeline (``slimray.pipelines.run_pipeline``): ``distil`` (teacher,
    derived or configured student on Ray Train, labels-only baseline; with a distillation space, the sweep's
    best student goes on) then ``search`` (compression sweep on Ray Tune, finalists re-timed side by side,
    winner, report)."""

    names = ("distil", "search")

    def check(self) -> None:
        self.user_teacher = check_config(self.cfg)

    def open(self, run_dir: Path, t_start: float) -> None:
        self.run = open_data(self.cfg, run_dir, t_start, user_teacher=self.user_teacher)

    def distil(self) -> None:
        cfg, run = self.cfg, self.run
        self.d = distill_stage(run)
        self.base_dir, self.summary, self.search_base = run.run_dir / "student", None, None
        if cfg.distill_sweep is not None and cfg.distill_sweep.distill is not None:
            self.summary = distill_sweep_stage(run, self.d)
            self.d.default_student, self.d.student = self.d.student, load_artifact(run.run_dir / BEST_STUDENT)[0]
            self.base_dir = run.run_dir / BEST_STUDENT
        elif self.d.baseline is not None:
            self.search_base = search_base(run, self.d)
            if self.search_base["student"] == "student_labels_only":
                self.base_dir = run.run_dir / "student_labels_only"

    def search(self) -> dict[str, Any]:
        return sweep_stage(self.run, self.d, base_dir=self.base_dir, distill_sweep=self.summary, search_base=self.search_base)


def search_base(run: Run, d: Distilled) -> dict[str, Any]:
    """KD is not taken on trust: the search starts from whichever student validates better, the distilled one or the
    one trained on labels only with the same budget (a tie keeps the distilled one)."""
    x, y = run.split["val"]
    kd, labels = accuracy(d.student, x, y), accuracy(d.baseline, x, y)
    student = "student_labels_only" if labels > kd else "student"
    log(f"search base: distilled student {kd:.2f}% vs labels only {labels:.2f}% on validation: the search starts from the "
        f"{'labels-only' if labels > kd else 'distilled'} student")
    return {"student": student, "val_accuracy_distilled": kd, "val_accuracy_labels_only": labels, "kd_gain_points": kd - labels}


BEST_STUDENT = "student_best"


def _recipe_settings(cfg: PipelineConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """The recipe's values of the fields a distillation space ranges over (how the default student was made)."""
    d = cfg.distill
    out = {}
    for k in fields:
        if k == "width":
            out[k] = 1.0
        elif k == "depth":
            out[k] = len(d.student.conv_channels) if d.student.kind == "cnn" else len(d.student.hidden)
        else:
            out[k] = getattr(d, k)
    out["epochs"] = d.epochs
    out["num_workers"] = d.num_workers
    return out


def distill_sweep_stage(run: Run, d: Distilled, *, resume: bool = True) -> dict[str, Any]:
    """Tune over Train: one Ray Train run per point of the distillation space; the best student (held-out
    accuracy; ties: smaller, then faster) is copied to ``RUN/student_best``. The recipe-settings student
    (``d.student``, if trained) competes too. Returns the summary (also ``RUN/distill_sweep.{json,md,png}``)."""
    from slimray.families.classifier.report import write_distill_sweep
    from slimray.sweep.distill_search import DistillSweepContext, pick_best, run_distill_sweep
    from slimray.sweep.engine import plan_train_trials

    cfg, run_dir = run.cfg, run.run_dir
    space = cfg.distill_sweep
    summary_path = run_dir / "distill_sweep.json"
    if summary_path.exists() and reusable(run_dir / BEST_STUDENT, spec_cls=ArtifactSpec, log=log):
        log("distillation sweep: reusing the finished sweep")
        return json.loads(summary_path.read_text())
    s = space.search
    concurrent = plan_train_trials(
        num_trials=space.num_trials, num_workers=s.num_workers, cpus_per_worker=s.cpus_per_worker, use_gpu=s.use_gpu,
        max_concurrent_trials=s.max_concurrent_trials, what="distillation sweep",
    )
    log(
        f"distillation sweep ({s.algorithm}{', asha' if s.scheduler == 'asha' else ''}): {space.num_trials} trials over "
        f"{space.distill.varying() or list(space.distill.params())}, {s.num_workers} Ray Train worker(s) each, {concurrent} at a time"
    )
    if cfg.distill.student is None:  # trials start from the derived student
        derive_student(run, d.teacher, load_spec(run_dir / "teacher"))
    ctx = DistillSweepContext(
        run_dir=str(run_dir), storage_path=str(run_dir / "ray"), sweep_name=f"{cfg.name}-distill-sweep",
        distill=cfg.distill.model_dump(), space=space.model_dump(), input_spec=run.input.model_dump(),
        data=TrainData(**run.refs, teacher_logits=d.logits_ref, train_stream=run.stream), teacher_dir=str(run_dir / "teacher"),
        student_init_dir=str(run_dir / "student_init") if cfg.distill.student is None else None,
    )
    rows = run_distill_sweep(ctx, max_concurrent_trials=concurrent, resume=resume)
    log(f"distillation sweep: {sum(r['status'] == 'completed' for r in rows)}/{len(rows)} trials completed")

    b = cfg.search.serving_batch_size
    (x_va, y_va), (x_te, y_te) = run.split["val"], run.split["test"]
    models: dict[str, torch.nn.Module] = {r["trial_id"]: load_artifact(r["artifact"])[0] for r in rows if r["status"] == "completed"}
    default = d.student if d.student is not None else (
        load_artifact(run_dir / "student")[0] if (run_dir / "student" / "spec.json").exists() else None
    )
    if default is not None:
        models["default"] = default
    log(f"timing {len(models)} students side by side (batch 1 and {b})")
    timed = compare_latency(models, x_te[:b], batch_sizes=sorted({1, b}), num_threads=cfg.search.num_threads)
    settings = {r["trial_id"]: r["settings"] for r in rows}
    settings["default"] = _recipe_settings(cfg, space.distill.params())
    candidates = [
        {
            "key": k, "settings": settings.get(k, {}), "val_accuracy": accuracy(m, x_va, y_va), "test_accuracy": accuracy(m, x_te, y_te),
            "params": count_params(m), "latency_ms": {f"batch_{bb}": v for bb, v in timed[k].items()}, "lat": timed[k][b],
        }
        for k, m in models.items()
    ]
    best = pick_best(candidates, tie_tolerance=s.tie_tolerance, latency_key="lat")
    src = run_dir / "student" if best["key"] == "default" else next(r["artifact"] for r in rows if r["trial_id"] == best["key"])
    copy_artifact(src, run_dir / BEST_STUDENT, update={"name": BEST_STUDENT, "metadata": {"trial": best["key"]}})
    log(f"distillation sweep: best student {best['key']} ({best['val_accuracy']:.2f}% val, {best['params']} params)")
    summary = {
        "search": s.model_dump(), "space": space.distill.model_dump(exclude_none=True), "varying": space.distill.varying(),
        "serving_batch_size": b, "max_concurrent_trials": concurrent, "wall_s": rows[0]["sweep_wall_s"] if rows else 0.0,
        "trial_seconds": sum(r.get("trial_seconds") or 0.0 for r in rows),
        "trials": [{k: v for k, v in r.items() if k != "sweep_wall_s"} for r in rows],
        "candidates": [{k: v for k, v in c.items() if k != "lat"} for c in candidates],
        "best": {k: v for k, v in best.items() if k != "lat"},
        "default": next(({k: v for k, v in c.items() if k != "lat"} for c in candidates if c["key"] == "default"), None),
    }
    write_distill_sweep(summary, run_dir)
    return summary


def sweep_stage(
    run: Run, d: Distilled, *, base_dir: Path, resume: bool = True, distill_sweep: dict[str, Any] | None = None,
    search_base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compress the model in ``base_dir`` (the student, or any artifact), pick the winner, write the report."""
    cfg, run_dir, t_start = run.cfg, run.run_dir, run.t_start
    (x_va, y_va), (x_te, y_te) = run.split["val"], run.split["test"]
    refs, logits_ref, teacher, baseline = run.refs, d.logits_ref, d.teacher, d.baseline
    student = d.student if d.student is not None else load_artifact(base_dir)[0]
    student_dir = run_dir / "student" if search_base and search_base["student"] == "student_labels_only" else base_dir
    s = cfg.search
    b = s.serving_batch_size
    lat_key = f"latency_ms_b{b}"
    x_ref, y_ref = (x_va, y_va) if s.teacher_reference_split == "val" else (x_te, y_te)
    metric = load_metric(cfg.eval, default_max_drop=s.max_accuracy_drop, code_dir=cfg.teacher.code_dir)
    teacher_value = metric.value(teacher, x_ref, y_ref)
    teacher_ref, drop = metric.quality(teacher_value), metric.budget(teacher_value)
    floor = teacher_ref - drop
    if metric.fn is None:
        log(f"accuracy floor: teacher {teacher_ref:.2f}% on {s.teacher_reference_split} - {drop} points")
        if teacher_ref >= 100.0 - 1e-9:
            log(f"note: the teacher makes no error on the {len(y_ref)} {s.teacher_reference_split} examples; if it was trained on "
                f"them, this is its training accuracy and every trial must match it on examples it never saw: give held-out "
                f"data (data.test with search.teacher_reference_split: test; `slimray init --test`)")
    else:
        log(f"{metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better): teacher {teacher_value:.4g} on "
            f"{s.teacher_reference_split}; the winner may lose {drop:.4g}")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrent = s.max_concurrent_trials or max(1, cpus)
    settings = [f"{q}@{r}" for q, r in s.space.settings]
    log(
        f"sweep ({s.algorithm}{', asha' if s.scheduler == 'asha' else ''}): {s.num_trials} trials over prune "
        f"{s.space.prune_ratios} x {settings}, {concurrent} at a time"
    )
    for q, r, why in s.space.dropped:
        log(f"  left out {q}@{r}: {why}")
    ctx = SweepContext(
        run_dir=str(run_dir), base_model_dir=str(base_dir), search=s.model_dump(), accuracy_floor=floor,
        temperature=cfg.distill.temperature, alpha=cfg.distill.alpha, seed=cfg.distill.seed, **refs, teacher_logits=logits_ref,
        evaluation=cfg.eval.model_dump(), code_dir=cfg.teacher.code_dir,
    )
    t_sweep = time.perf_counter()
    trials = run_sweep(ctx, run_name=f"{cfg.name}-sweep", max_concurrent_trials=concurrent, resume=resume)
    sweep_wall_s = time.perf_counter() - t_sweep
    n_ok = sum(t["status"] == "ok" for t in trials)
    log(f"sweep: {n_ok}/{len(trials)} trials finished")
    for t in trials:
        if t["status"] != "ok":
            log(f"  failed: {t.get('explanation') or t.get('error')}")
    too_many = most_failed(trials)
    if too_many:
        log(f"sweep: {too_many}")

    ok = feasible(trials, teacher_accuracy=teacher_ref, max_drop=drop)
    # one entry per key (random search may draw a point twice)
    ok = list({t["key"]: t for t in rank_fastest(ok, latency_key=lat_key)[::-1]}.values())[::-1]
    finalists = rank_fastest(ok, latency_key=lat_key)[: s.num_finalists] if ok else []
    if not finalists:  # nothing within the budget: the most accurate trial, reported as such
        w, _, _ = choose(trials, quality_key="accuracy", higher_is_better=True, floor=floor, speed_key=lat_key, faster="min")
        if w is None:
            raise sweep_failure(trials)
        finalists = [w]

    # Re-time teacher, students and finalists side by side: these figures go into the report.
    models: dict[str, torch.nn.Module] = {"teacher": teacher, "student": student}
    if baseline is not None:
        models["student_labels_only"] = baseline
    if d.default_student is not None:
        models["student_default"] = d.default_student
    for t in finalists:
        models[t["key"]] = load_runnable(t["artifact"], num_threads=s.num_threads)[0]
    for t in finalists:  # the pruned fp32 torch model of each finalist's ratio, for the gain breakdown
        k = trial_key(t["prune_ratio"], "none")
        if t["prune_ratio"] > 0 and k not in models:
            models[k] = _pruned_fp32(run_dir, base_dir, t, trials)
    runtimes = sorted({t.get("runtime", "torch") for t in finalists} - {"torch"})
    for r in runtimes:
        log(f"teacher in runtime {r} (fp32), for the same-runtime speedup")
        models[f"teacher@{r}"] = in_runtime(teacher, r, x_te[:b], num_threads=s.num_threads)
    batch_sizes = sorted({1, b})

    def one_round(order: list[str]) -> dict[str, dict[str, float]]:
        ms = compare_latency({k: models[k] for k in order}, x_te[:b], batch_sizes=batch_sizes, num_threads=s.num_threads, num_rounds=1)
        return {k: {**{f"ms_b{bb}": v for bb, v in per.items()}, "per_s": 1e3 * b / per[b]} for k, per in ms.items()}

    samples, num_rounds = timed_rounds(list(models), one_round, num_rounds=s.num_rounds, most_rounds=s.most_rounds,
                                       leaders=[t["key"] for t in finalists], speed_key="per_s")
    log(f"timed {len(models)} models side by side in {num_rounds} rounds ({s.num_threads} thread(s), batch 1 and {b})")
    timed = {k: {bb: statistics.median(figs[f"ms_b{bb}"]) for bb in batch_sizes} for k, figs in samples.items()}
    for t in finalists:
        t["retimed"] = timed[t["key"]]
    # the one winner rule on the side-by-side rounds: the finalists are the feasible ones (or the one most accurate), so
    # the fastest wins unless its lead is inside the noise (search.noise_margin), where the smaller of the tied wins
    pick, _, tied = choose([{"key": t["key"], "accuracy": t["accuracy"], "per_s": 1e3 * b / t["retimed"][b], "size_bytes": t["size_bytes"]}
                            for t in finalists], quality_key="accuracy", higher_is_better=True, floor=-math.inf, speed_key="per_s",
                           rounds={t["key"]: samples[t["key"]]["per_s"] for t in finalists}, margin=s.noise_margin)
    winner = next(t for t in finalists if t["key"] == pick["key"])
    if tied:
        log(f"winner {winner['key']}: tied within the noise ({s.noise_margin:.0%}) with {', '.join(t['key'] for t in tied)}; "
            "the smaller wins")
    constraint_met = winner in ok
    w_runtime = winner.get("runtime", "torch")

    def lat(name: str) -> dict[str, float]:
        return {f"batch_{k}": v for k, v in timed[name].items()}

    def entry(name: str, model: torch.nn.Module, path: Path | None) -> dict[str, Any]:
        bs = b if name == winner["key"] and w_runtime == "torch_compile" else 1024  # compiled: serving-size batches
        e = {"accuracy": accuracy(model, x_te, y_te, batch_size=bs), "val_accuracy": accuracy(model, x_va, y_va, batch_size=bs),
             "latency_ms": lat(name)}
        if metric.fn is not None:  # the user's metric beside accuracy
            e["metric"] = {"test": metric.value(model, x_te, y_te, batch_size=bs), "val": metric.value(model, x_va, y_va, batch_size=bs)}
        if path is not None:
            e["size_bytes"] = artifact_bytes(path)
        return e

    winner_spec = copy_artifact(winner["artifact"], run_dir / "winner", update={"name": cfg.name, "metadata": {"trial": winner["key"]}})
    winner_model = models[winner["key"]]  # scored in the runtime that serves it

    t_entry = entry("teacher", teacher, run_dir / "teacher") | {"params": count_params(teacher), "runtime": "torch"}
    s_entry = entry("student", student, student_dir) | {"params": count_params(student), "source": str(student_dir)}
    if baseline is not None:
        s_entry["accuracy_without_distillation"] = accuracy(baseline, x_te, y_te)
        s_entry["labels_only"] = entry("student_labels_only", baseline, run_dir / "student_labels_only") | {"params": count_params(baseline)}
    w_entry = entry(winner["key"], winner_model, run_dir / "winner") | {
        "params": winner["params"], "prune_ratio": winner["prune_ratio"], "quantization": winner["quantization"],
        "runtime": w_runtime, "key": winner["key"], "architecture": winner_spec.model.model_dump(),
        "peak_memory_bytes": winner.get("peak_memory_bytes"),
    }
    if winner.get("runtime_check"):
        w_entry["runtime_check"] = winner["runtime_check"]
    breakdown = [("teacher (fp32, torch)", "teacher"), ("student (fp32, torch)", "student")]
    w_ratio_key = trial_key(winner["prune_ratio"], "none")
    if w_ratio_key in timed and winner["prune_ratio"] > 0 and w_ratio_key != winner["key"]:
        breakdown.append((f"+ pruning {winner['prune_ratio']:.2f} (fp32, torch)", w_ratio_key))
    if winner["key"] not in {k for _, k in breakdown}:
        breakdown.append((f"+ {winner['quantization']} in {w_runtime} (winner)", winner["key"]))
    t_b = timed["teacher"][b]
    same_runtime = f"teacher@{w_runtime}" if w_runtime != "torch" else "teacher"
    report = {
        "name": cfg.name,
        "recipe": cfg.recipe or cfg.name,
        "dataset": run.name,
        "max_accuracy_drop": drop,
        "accuracy_floor": floor,
        "metric": metric.describe() | {"teacher_reference": teacher_value, "budget": drop},
        "teacher_reference_split": s.teacher_reference_split,
        "serving_batch_size": b,
        "constraint_met": constraint_met,
        "teacher": t_entry,
        "student": s_entry,
        "search_base": search_base or {"student": base_dir.name},
        "winner": w_entry,
        "speedup_vs_teacher": {f"batch_{k}": timed["teacher"][k] / timed[winner["key"]][k] for k in batch_sizes},
        "speedup_vs_teacher_same_runtime": {
            "runtime": w_runtime,
            "teacher_latency_ms": lat(same_runtime),
            **{f"batch_{k}": timed[same_runtime][k] / timed[winner["key"]][k] for k in batch_sizes},
        },
        "gain_breakdown": [
            {"step": label, "model": key, "latency_ms": timed[key][b], "speedup_vs_teacher": t_b / timed[key][b]} for label, key in breakdown
        ],
        "timing": {"num_threads": s.num_threads, "batch_sizes": batch_sizes, "num_rounds": num_rounds, "noise_margin": s.noise_margin,
                   "tied_with": [t["key"] for t in tied], "method": "median of interleaved rounds, order shuffled each round, one process"},
        "search": {
            "algorithm": s.algorithm, "scheduler": s.scheduler, "num_trials": len(trials), "wall_s": sweep_wall_s,
            "trial_seconds": sum(t.get("trial_seconds") or 0.0 for t in trials),
            "left_out": [{"quantization": q, "runtime": r, "why": why} for q, r, why in s.space.dropped],
            "most_failed": most_failed(trials),
        },
        "trials": [_trial_row(t, batch_sizes) for t in trials],
        "elapsed_s": time.perf_counter() - t_start,
    }
    if d.default_student is not None:
        report["student_default"] = entry("student_default", d.default_student, run_dir / "student") | {
            "params": count_params(d.default_student)
        }
    if distill_sweep is not None:
        report["distill_sweep"] = distill_sweep
    report["pareto_front"] = [
        {"key": t["key"], "val_accuracy": t["val_accuracy"], "latency_ms": t["latency_ms"]}
        for t in pareto_front(
            [dict(t, accuracy=t["val_accuracy"], **{lat_key: t["latency_ms"][f"batch_{b}"]}) for t in report["trials"] if t["status"] == "ok"],
            latency_key=lat_key,
        )
    ]
    write_json_atomic(run_dir / "report.json", report)
    write_report_files(report, run_dir)
    log("results (test accuracy; latencies re-timed side by side):\n" + headline_table(report))
    log(f"report: {run_dir / 'report.md'}  plot: {run_dir / 'pareto.png'}  ({report['elapsed_s']:.0f} s)")
    return report


def _pruned_fp32(run_dir: Path, base_dir: Path, t: dict[str, Any], trials: list[dict[str, Any]]) -> torch.nn.Module:
    """The fp32 torch model a finalist was quantized from (its trial, or the cached pruned model)."""
    key = trial_key(t["prune_ratio"], "none")
    same = next((o for o in trials if o.get("key") == key and o["status"] == "ok"), None)
    if same is not None:
        return load_artifact(same["artifact"])[0]
    cached = sorted((run_dir / "pruned").glob(f"prune{t['prune_ratio']:.2f}-e*/spec.json"))
    epochs = t.get("finetune_epochs")
    exact = run_dir / "pruned" / f"prune{t['prune_ratio']:.2f}-e{epochs}"
    return load_artifact(exact if (exact / "spec.json").exists() else cached[-1].parent)[0]


def _trial_row(t: dict[str, Any], batch_sizes: list[int]) -> dict[str, Any]:
    row = {
        "key": t.get("key", trial_key(t["prune_ratio"], t["quantization"], t.get("runtime", "torch"))),
        "prune_ratio": t["prune_ratio"], "quantization": t["quantization"], "runtime": t.get("runtime", "torch"),
        "status": t["status"], "error": t.get("error"), "stage": t.get("stage"), "where": t.get("where"), "advice": t.get("advice"),
        "explanation": t.get("explanation"), "val_accuracy": t.get("accuracy"), "metric_value": t.get("metric_value"),
        "params": t.get("params"),
        "size_bytes": t.get("size_bytes"), "peak_memory_bytes": t.get("peak_memory_bytes"),
        "finetune_epochs": t.get("finetune_epochs"), "stopped_early": t.get("stopped_early"),
        "trial_seconds": t.get("trial_seconds"), "runtime_check": t.get("runtime_check"),
        "latency_ms": {f"batch_{k2}": t[f"latency_ms_b{k2}"] for k2 in batch_sizes} if t["status"] == "ok" else None,
        "latency_ms_side_by_side": {f"batch_{k2}": v for k2, v in t["retimed"].items()} if "retimed" in t else None,
        "finalist": "retimed" in t,
    }
    return {k: v for k, v in row.items() if v is not None}
