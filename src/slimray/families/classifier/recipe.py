"""The classifier family's hooks for the shared pipeline (``slimray.families.recipe.Recipe``): any ``nn.Module`` from a
tensor to class logits, the user's own (a factory + safetensors weights, or a local Hugging Face image classifier), the
packaged MNIST CNN, or one trained first on labels.

- data: the built-in datasets (``datasets.py``), loaded on the driver and shared through the object store, or files on
  disk (and, with ``data.stream``, a built-in dataset written as Parquet): the pipeline reads those through Ray Data,
  the Train workers read shards and the teacher's logits are a batch-inference job (``stream_source``);
- students: ``distill.student`` (a CNN or MLP spec) or one derived from the teacher by structured pruning
  (``derive.py``, the default), distilled on logits or features (``train.py``'s task) and trained on labels only beside it;
- the quality: validation accuracy in percent, or the user's metric (``eval.metric``) as a signed quality (negated when
  lower is better), within ``search.max_accuracy_drop`` / ``eval.max_drop`` / ``eval.max_relative_drop`` of the
  teacher's on ``search.teacher_reference_split``;
- a trial (``search.py: compression_steps``): prune, fine-tune epoch by epoch with KD (each epoch a row: ASHA's budget),
  quantize, save in its runtime (torch, ``torch.compile``, ONNX Runtime), memory, latency at batch 1 and the serving batch
  under the trials' timing lock; random or Optuna sampling over the prune ratios x settings (``search_plan``);
- beside each finalist: the teacher in the finalist's runtime and its prune ratio in fp32 (what pruning, quantization and
  the runtime each bought: ``gain_breakdown`` in report.json).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimray.compress.measure import accuracy, compare_latency, predict_logits, torch_threads
from slimray.evaluation import Metric, load_metric
from slimray.families.classifier.artifacts import (
    ArtifactSpec, artifact_bytes, artifact_files, copy_artifact, load_artifact, load_artifact_bytes, load_runnable, save_artifact,
)
from slimray.families.classifier.spec import InputSpec, ModuleSpec, count_params, parse_spec, spec_from_model
from slimray.families.recipe import Column, Quality, Recipe, SearchPlan, StudentPlan
from slimray.storage import reusable

STUDENT = "student"


class ClassifierData:
    """The run's data on the driver: normalised tensors (``x_train``/``y_train`` are the whole training split for
    built-in data, a sample of the teacher's outputs for streamed data), the raw test split (the run's test sample and
    the sample request), the teacher's logits on ``x_train`` once known, and what the trials read."""

    def __init__(self, *, name: str, input: InputSpec, num_classes: int, num_train: int, x_val: torch.Tensor, y_val: torch.Tensor,
                 x_test: torch.Tensor, y_test: torch.Tensor, raw_test: np.ndarray, x_train: torch.Tensor | None = None,
                 y_train: torch.Tensor | None = None, streamed: bool = False, num_threads: int = 1, serving_batch_size: int = 64):
        self.name, self.input, self.num_classes, self.num_train = name, input, num_classes, num_train
        self.x_val, self.y_val, self.x_test, self.y_test, self.raw_test = x_val, y_val, x_test, y_test, raw_test
        self.x_train, self.y_train = x_train, y_train
        self.teacher_logits: np.ndarray | None = None
        self.streamed = streamed  # the Train workers read the training split (and the teacher's logits) from Ray Data
        self.num_threads, self.serving_batch_size = num_threads, serving_batch_size  # how the finalists are built and timed

    def arrays(self) -> dict[str, Any]:
        """What a trial reads (numpy arrays)."""
        return {"x_train": self.x_train.numpy(), "y_train": self.y_train.numpy(), "teacher_logits": self.teacher_logits,
                "x_val": self.x_val.numpy(), "y_val": self.y_val.numpy()}


def teacher_spec(cfg: Any) -> Any:
    """The teacher's model spec from the config (the user's factory or HF folder, the packaged CNN, or one to train)."""
    from slimray.families.classifier.teachers import CCEXAM_MNIST_SPEC

    t = cfg.teacher
    if t.is_users:
        return t.module_spec()
    return CCEXAM_MNIST_SPEC if t.source == "ccexam_mnist" else t.model


def metric_of(cfg: Any) -> Metric:
    return load_metric(cfg.eval, default_max_drop=cfg.search.max_accuracy_drop, code_dir=cfg.teacher.code_dir)


def _base_name(name: str) -> str:
    return name.removesuffix("-labels-only")


class ClassifierRecipe(Recipe):
    quality = Quality(key="accuracy", label="val accuracy %")  # or the user's metric, signed (quality_of)
    speed_key = "examples_per_s"
    speed_label = "examples/s (serving batch, 1 thread)"
    keep_teacher = True
    stepwise = True
    timing_lock = True
    columns = (Column("accuracy", "val quality", "{:.3f}"), Column("test_accuracy", "test acc %", "{:.2f}"),
               Column("params", "params", "{:d}"), Column("size_bytes", "size MB", "mb"),
               Column("latency_ms_b1", "ms b1", "{:.3f}"), Column("latency_ms_serving", "ms serving batch", "{:.3f}"),
               Column("examples_per_s", "examples/s", "{:.0f}"), Column("speedup", "speedup", "x"))

    def __init__(self) -> None:
        self._user_teacher: nn.Module | None = None
        self._plans: dict[str, StudentPlan] = {}
        self._init: dict[str, dict[str, torch.Tensor]] = {}
        self._meta: dict[str, Any] = {}  # a derived student's record (what was pruned), in its artifact's metadata
        self._run_dir: Path | None = None

    def quality_of(self, cfg: Any) -> Quality:
        metric = metric_of(cfg)
        if metric.fn is None:
            return Quality(key="accuracy", label="val accuracy %")
        sign = "" if metric.higher_is_better else "-"
        return Quality(key="accuracy", label=f"{sign}{metric.name.rsplit(':', 1)[-1]} (val)")


    def is_saved(self, path: Path) -> bool:
        from slimray.runs import log

        return reusable(path, spec_cls=ArtifactSpec, log=log)  # verified against its sha256s; a damaged one is rebuilt

    # ------------------------------------------------------------------------------------------------ data, teacher
    def check(self, cfg: Any) -> None:
        from slimray.families.classifier.teachers import check_teacher_layer, load_user_teacher

        check_teacher_layer(cfg)  # a bad feature_kd layer fails before the teacher is trained
        metric_of(cfg)  # the user's metric imported now: a bad path fails before any work
        if cfg.teacher.is_users:
            self._user_teacher = load_user_teacher(cfg)

    def prepare(self, cfg: Any, run_dir: Path) -> ClassifierData:
        from slimray.families.classifier.datasets import load_dataset
        from slimray.families.classifier.sample import write_test_sample
        from slimray.runs import log

        self._run_dir = run_dir
        if cfg.data.source == "files":
            return None  # type: ignore[return-value]  # opened by the pipeline (stream_source)
        ds = load_dataset(cfg.data.name, seed=cfg.data.seed)
        if cfg.data.stream:
            return ds  # type: ignore[return-value]  # written as Parquet and read through Ray Data
        write_test_sample(run_dir, ds.test.x, ds.test.y)
        self._input_spec = ds.input.model_dump()
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (ds.normalized(k) for k in ("train", "val", "test"))
        log(f"data {ds.name}: {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test, {ds.num_classes} classes, "
            f"examples {ds.input.shape}")
        return ClassifierData(name=ds.name, input=ds.input, num_classes=ds.num_classes, num_train=len(ds.train), x_val=x_va, y_val=y_va,
                              x_test=x_te, y_test=y_te, raw_test=ds.test.x, x_train=x_tr, y_train=y_tr,
                              num_threads=cfg.search.num_threads, serving_batch_size=cfg.search.serving_batch_size)

    def stream_source(self, cfg: Any, data: Any) -> Any:
        if cfg.data.source == "files":
            return cfg.data
        return data if cfg.data.stream else None

    def with_stream(self, cfg: Any, data: Any, opened: Any, *, run_dir: Path) -> ClassifierData:
        from slimray.families.classifier.sample import write_test_sample
        from slimray.runs import log

        write_test_sample(run_dir, opened.test.x, opened.test.y)
        self._input_spec = opened.input.model_dump()
        norm = lambda s: (opened.input.normalize(torch.from_numpy(s.x)), torch.from_numpy(s.y))  # noqa: E731
        (x_va, y_va), (x_te, y_te) = norm(opened.val), norm(opened.test)
        log(f"data {opened.name}: {opened.num_train} train (streamed) / {len(y_va)} val / {len(y_te)} test, "
            f"{opened.num_classes} classes, examples {opened.input.shape}")
        return ClassifierData(name=opened.name, input=opened.input, num_classes=opened.num_classes, num_train=opened.num_train,
                              x_val=x_va, y_val=y_va, x_test=x_te, y_test=y_te, raw_test=opened.test.x, streamed=True,
                              num_threads=cfg.search.num_threads, serving_batch_size=cfg.search.serving_batch_size)

    def teacher_outputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        x = torch.from_numpy(np.ascontiguousarray(batch["x"]))
        with torch.inference_mode():
            logits = model(self._input.normalize(x))
        return {"x": batch["x"], "y": batch["y"], "logits": logits.float().numpy()}

    def artifact_files(self, path: Path) -> dict[str, bytes]:
        return artifact_files(path)

    def load_bytes(self, files: dict[str, bytes]) -> nn.Module:
        model, spec = load_artifact_bytes(files)
        self._input = spec.input  # the batch-inference actor's recipe: teacher_outputs normalises batches with it
        return model

    def sample_size(self, cfg: Any, data: ClassifierData) -> int:
        from slimray.families.classifier.datasets import rows_within_budget  # what fits the driver's memory

        return rows_within_budget(data.input.shape, cfg.search.finetune_examples)

    def with_sample(self, cfg: Any, data: ClassifierData, sample: dict[str, Any]) -> ClassifierData:
        data.x_train = data.input.normalize(torch.from_numpy(sample["x"]))
        data.y_train = torch.from_numpy(sample["y"])
        data.teacher_logits = sample["logits"]
        return data

    def teacher(self, cfg: Any, data: ClassifierData) -> nn.Module | None:
        from slimray.families.classifier.teachers import check_takes_examples, load_ccexam_mnist_teacher, load_user_teacher
        from slimray.runs import log

        t = cfg.teacher
        if t.is_users:
            model = self._user_teacher if self._user_teacher is not None else load_user_teacher(cfg)
            check_takes_examples(model, cfg, data.input.shape)
            log(f"teacher: {t.factory if t.source == 'module' else t.path} with weights {t.weights_file()}")
            return model
        if t.source == "ccexam_mnist":
            log("teacher: the pretrained ccexam MNIST CNN")
            return load_ccexam_mnist_teacher()[0]
        return None

    def teacher_job(self, cfg: Any) -> tuple[StudentPlan, dict[str, Any]]:
        from slimray.runs import log

        t, d = cfg.teacher, cfg.distill
        plan = StudentPlan("teacher", t.model.model_dump())
        self._plans["teacher"] = plan
        log(f"teacher: training {plan.spec} on labels, {d.num_workers} Ray Train workers")
        return plan, {**self._loop(cfg), "epochs": t.epochs, "lr": t.lr, "lr_schedule": "constant", "weight_decay": 0.0,
                      "task": self._task(cfg, alpha=0.0)}

    def evaluate(self, cfg: Any, model: nn.Module, data: ClassifierData) -> dict[str, Any]:
        metric = metric_of(cfg)
        val_acc, test_acc = accuracy(model, data.x_val, data.y_val), accuracy(model, data.x_test, data.y_test)
        # accuracy is the metric unless the user gave one: then it is scored too (one more pass per split)
        value, test_value = (val_acc, test_acc) if metric.fn is None else (
            metric.value(model, data.x_val, data.y_val), metric.value(model, data.x_test, data.y_test))
        row = {"accuracy": metric.quality(value), "val_accuracy": val_acc, "test_accuracy": test_acc, "params": count_params(model),
               "size_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))}
        if metric.fn is not None:
            row.update(metric_value=value, test_metric=test_value)
        if cfg.search.teacher_reference_split == "test":  # the floor is measured from the teacher's held-out value
            row.update(reference_value=test_value, reference=metric.quality(test_value))
        return row

    def reference(self, cfg: Any, teacher: dict[str, Any]) -> float:
        return float(teacher.get("reference", teacher["accuracy"]))

    def budget(self, cfg: Any, *, teacher: dict[str, Any]) -> float:
        return metric_of(cfg).budget(self._reference_value(teacher))

    @staticmethod
    def _reference_value(teacher: dict[str, Any]) -> float:
        """The teacher's metric value on the reference split (``search.teacher_reference_split``)."""
        return float(teacher.get("reference_value", teacher.get("metric_value", teacher["accuracy"])))

    # ------------------------------------------------------------------------------------------------ students
    def plan_students(self, cfg: Any, teacher: nn.Module, *, data: ClassifierData) -> list[StudentPlan]:
        d = cfg.distill
        if d.student is not None:
            plan = StudentPlan(STUDENT, d.student.model_dump(), note=f"{d.student.kind} from distill.student")
        else:
            from slimray.families.classifier.derive import derive

            x, y = (data.x_train, data.y_train) if data.x_train is not None else (data.x_val, data.y_val)
            pruned, info, note = derive(teacher, x, y, d.derive)
            spec = spec_from_model(pruned, teacher_spec(cfg))
            if isinstance(spec, ModuleSpec):
                spec = spec.model_copy(update={"note": note})
            plan = StudentPlan(STUDENT, spec.model_dump(), note=f"derived from the {note}; {count_params(teacher):,} -> "
                                                                 f"{count_params(pruned):,} params")
            self._init[STUDENT] = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
            self._meta = {"derived": info}
        self._plans[STUDENT] = plan
        return [plan]

    def init_state(self, cfg: Any, plan: StudentPlan, teacher: nn.Module) -> dict[str, Any] | None:
        return self._init.get(plan.name)

    def _loop(self, cfg: Any) -> dict[str, Any]:
        d = cfg.distill
        return {"use_gpu": d.use_gpu, "max_failures": d.max_failures, "strategy": d.strategy, "placement_strategy": d.placement_strategy}

    def _task(self, cfg: Any, *, alpha: float, feature_kd: Any = None) -> dict[str, Any]:
        d = cfg.distill
        assert self._run_dir is not None
        return {"alpha": alpha, "temperature": d.temperature, "teacher_outputs": d.teacher_outputs,
                "teacher_dir": str((self._run_dir / "teacher").resolve()), "teacher_half_precision": d.teacher_half_precision,
                "feature_kd": feature_kd.model_dump() if feature_kd is not None else None, "input_spec": self._input_spec}

    def train_job(self, cfg: Any, plan: StudentPlan, *, distilled: bool) -> dict[str, Any]:
        from slimray.runs import log

        d = cfg.distill
        kd = distilled and d.loss != "labels"
        how = (f"KD on {d.loss} (T={d.temperature}, alpha={d.alpha}, teacher {d.teacher_outputs})" if kd
               else "labels only" + ("" if distilled else " (same budget)"))
        log(f"{plan.name}{'' if distilled else ' (labels only)'}: {d.epochs} epochs, {how}, {d.num_workers} Ray Train workers "
            f"({d.strategy}, {d.placement_strategy})")
        if kd and d.loss == "features":  # the layers and their projection resolved here: a bad pair fails before any worker
            from slimray.families.classifier.features import build_projection
            from slimray.families.classifier.spec import build_model
            from slimray.families.classifier.train import example_input

            assert self._run_dir is not None
            spec = parse_spec(plan.spec)
            build_projection(build_model(spec), load_artifact(self._run_dir / "teacher")[0], d.feature_kd,
                             example_input(spec, self._input_spec["shape"]))
        return {**self._loop(cfg), "epochs": d.epochs, "lr": d.lr, "lr_schedule": d.lr_schedule, "weight_decay": d.weight_decay,
                "task": self._task(cfg, alpha=d.alpha if kd else 0.0, feature_kd=d.feature_kd if kd and d.loss == "features" else None)}

    def job_spec(self, plan: StudentPlan, data: ClassifierData) -> dict[str, Any]:
        return plan.spec

    def train_data(self, cfg: Any, data: ClassifierData, teacher: nn.Module | None) -> dict[str, Any]:
        from slimray.families.classifier.artifacts import load_spec

        d = cfg.distill
        streamed = data.streamed
        out: dict[str, Any] = {"x_train": None if streamed else data.x_train.numpy(), "y_train": None if streamed else data.y_train.numpy(),
                               "x_val": data.x_val.numpy(), "y_val": data.y_val.numpy(), "teacher_logits": None,
                               "teacher_files": None, "code_files": None}
        if teacher is not None:
            assert self._run_dir is not None
            teacher_dir = self._run_dir / "teacher"
            if d.teacher_outputs == "in_loop":
                out["teacher_files"] = artifact_files(teacher_dir)
            elif not streamed:
                out["teacher_logits"] = self._teacher_logits(teacher, data)
            spec = load_spec(teacher_dir) if (teacher_dir / "spec.json").exists() else None
            if spec is not None and isinstance(spec.model, ModuleSpec) and spec.model.code:
                from slimray.families.classifier.carried import files_for

                out["code_files"] = files_for(spec.model.code, search=(str(teacher_dir),))
        return out

    def _teacher_logits(self, teacher: nn.Module, data: ClassifierData) -> np.ndarray:
        """The teacher's logits on the training split, once (cached as RUN/teacher_logits.safetensors; a damaged file is
        recomputed)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        from slimray.runs import log

        if data.teacher_logits is not None:
            return data.teacher_logits
        assert self._run_dir is not None
        path = self._run_dir / "teacher_logits.safetensors"
        if path.exists():
            try:
                data.teacher_logits = load_file(str(path))["logits"].numpy()
                return data.teacher_logits
            except (SafetensorError, KeyError, OSError) as err:
                log(f"teacher: {path} is damaged ({type(err).__name__}): recomputing it")
        log(f"teacher: computing logits for {len(data.x_train)} training examples once (shared with every worker)")
        with torch_threads(os.cpu_count() or 1):
            logits = predict_logits(teacher, data.x_train, batch_size=512).contiguous()
        tmp = path.with_name(".teacher_logits.tmp")
        save_file({"logits": logits}, str(tmp))
        tmp.replace(path)
        data.teacher_logits = logits.numpy()
        return data.teacher_logits

    # ------------------------------------------------------------------------------------------------ search
    def candidates(self, cfg: Any) -> dict[str, dict[str, Any]]:
        from slimray.families.classifier.search import trial_key

        s = cfg.search
        return {trial_key(r, q, rt): {"prune_ratio": float(r), "quantization": q, "runtime": rt}
                for r in s.space.prune_ratios for q, rt in s.space.settings}

    def search_plan(self, cfg: Any) -> SearchPlan | None:
        from slimray.families.classifier.search import config_key, setting_name

        s = cfg.search
        if s.algorithm == "grid" and s.scheduler == "none":
            return None
        asha = None
        if s.scheduler == "asha":
            asha = {"time_attr": "finetune_epochs", "metric": "objective", "mode": "max", "max_t": s.finetune_epochs,
                    "grace_period": s.grace_period, "reduction_factor": s.reduction_factor}
        axes = {"prune_ratio": [float(r) for r in s.space.prune_ratios], "setting": [setting_name(q, r) for q, r in s.space.settings]}
        return SearchPlan(axes=axes, key_of=config_key, algorithm=s.algorithm, num_samples=s.num_trials if s.algorithm != "grid" else None,
                          metric=["accuracy", f"latency_ms_b{s.serving_batch_size}"], mode=["max", "min"],
                          num_startup_trials=s.num_startup_trials, asha=asha)

    def trial_input(self, name: str, model: nn.Module, *, folder: Path | None, data: Any) -> Any:
        assert folder is not None, "every classifier starting model has its folder (the teacher is kept: keep_teacher)"
        return str(folder)

    def measure_steps(self, cfg: Any, candidate: dict[str, Any], student: Any, data: ClassifierData, *, out_dir: Path,
                      timing: Any, floor: float) -> Any:
        from slimray.families.classifier.search import compression_steps

        s = cfg.search
        key = out_dir.name
        ctx = {"run_dir": str(out_dir.parent.parent), "base_model_dir": str(student), "temperature": cfg.distill.temperature,
               "alpha": cfg.distill.alpha, "seed": cfg.distill.seed, "accuracy_floor": floor, "evaluation": cfg.eval.model_dump(),
               "code_dir": cfg.teacher.code_dir,
               "candidates": {key: (candidate["prune_ratio"], candidate["quantization"], candidate["runtime"])}}
        b = s.serving_batch_size
        for row in compression_steps(key, {**data.arrays(), "timing": timing}, search=s, ctx=ctx):
            row = {k: v for k, v in row.items() if k != "key"}
            if row.get("status") == "ok":
                row["examples_per_s"] = 1e3 * b / row[f"latency_ms_b{b}"]
                row["latency_ms_serving"] = row[f"latency_ms_b{b}"]
            yield row

    def advice(self, error: str, candidate: dict[str, Any]) -> str:
        return (f"leave {candidate.get('quantization')}@{candidate.get('runtime')} out of search.space (or prune ratio "
                f"{candidate.get('prune_ratio')} out of search.space.prune_ratios)")

    def notes(self, cfg: Any) -> list[str]:
        return [f"left out {q}@{r}: {why}" for q, r, why in cfg.search.space.dropped]

    def build(self, candidate: dict[str, Any], student: nn.Module, data: ClassifierData) -> nn.Module:
        from slimray.families.classifier.search import in_runtime

        threads = data.num_threads
        if candidate.get("fp32_in_runtime"):
            return in_runtime(student, candidate["runtime"], data.x_test[: data.serving_batch_size], num_threads=threads)
        return load_runnable(candidate["artifact"], num_threads=threads)[0]

    def time(self, models: dict[str, nn.Module], data: ClassifierData, *, cfg: Any,
             settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        s = cfg.search
        b = s.serving_batch_size
        ms = compare_latency(models, data.x_test[:b], batch_sizes=sorted({1, b}), num_threads=s.num_threads, num_rounds=1)
        return {k: {"examples_per_s": 1e3 * b / per[b], "latency_ms_b1": per[1], "latency_ms_serving": per[b], f"latency_ms_b{b}": per[b]}
                for k, per in ms.items()}

    def timed_beside(self, cfg: Any, row: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        runtime = row.get("runtime", "torch")
        if runtime != "torch":  # the teacher in the finalist's runtime: what the runtime bought on its own
            out[f"teacher@{runtime}"] = ("teacher", {"runtime": runtime, "fp32_in_runtime": True, "quantization": "none",
                                                     "prune_ratio": 0.0})
        ratio = row.get("prune_ratio", 0.0)
        if ratio > 0 and (row.get("quantization") != "none" or runtime != "torch") and row.get("artifact"):
            from slimray.families.classifier.search import trial_key

            base = row["student"]
            key = f"{base}-{trial_key(ratio, 'none')}"
            run_dir = Path(row["artifact"]).parent.parent
            path = run_dir / "trials" / key
            if not (path / "spec.json").exists():
                cached = run_dir / "pruned" / f"prune{ratio:.2f}-e{row.get('finetune_epochs', 0)}"
                path = cached if (cached / "spec.json").exists() else None
            if path is not None:  # the same ratio in fp32 torch: what pruning bought on its own
                out[key] = (base, {"prune_ratio": ratio, "quantization": "none", "runtime": "torch", "artifact": str(path)})
        return out

    # ------------------------------------------------------------------------------------------------ artifacts
    def save(self, path: Path, model: nn.Module, *, candidate: dict[str, Any], cfg: Any, data: ClassifierData) -> None:
        name = path.name
        if name == "teacher":
            spec, meta = teacher_spec(cfg), {}
        else:
            plan = self._plans.get(_base_name(name))
            spec = parse_spec(plan.spec) if plan is not None else spec_from_model(model, teacher_spec(cfg))
            meta = self._meta
        save_artifact(path, model.eval(), ArtifactSpec(name=name, model=spec, input=data.input, metadata=meta))

    def load(self, path: Path) -> nn.Module:
        return load_artifact(path)[0]

    def export(self, path: Path, model: Any, *, candidate: dict[str, Any], base: nn.Module, cfg: Any, data: Any) -> None:
        src = Path(candidate["artifact"])
        copy_artifact(src, path, update={"name": cfg.name, "metadata": {"trial": src.name}})

    def sample_request(self, data: ClassifierData) -> dict[str, Any]:
        return {"inputs": data.raw_test[:2].tolist()}

    # ------------------------------------------------------------------------------------------------ report
    def report_extras(self, cfg: Any, result: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        from slimray.families.classifier.explain import most_failed
        from slimray.families.classifier.report import gain_breakdown_md, pruning_md

        s = cfg.search
        b = s.serving_batch_size
        data: ClassifierData = result["data"]
        metric = metric_of(cfg)
        teacher, winner, beside = result["teacher"], result["winner"], result["beside"]
        run_dir: Path = result["run_dir"]
        served, _ = load_runnable(run_dir / "winner", num_threads=s.num_threads)
        bs = b if winner.get("runtime") == "torch_compile" else 1024  # compiled: serving-size batches (fewer recompiles)
        winner_test = {"accuracy": accuracy(served, data.x_test, data.y_test, batch_size=bs),
                       "val_accuracy": accuracy(served, data.x_val, data.y_val, batch_size=bs), "size_bytes": artifact_bytes(run_dir / "winner")}
        if metric.fn is not None:
            winner_test["metric"] = {"test": metric.value(served, data.x_test, data.y_test, batch_size=bs),
                                     "val": metric.value(served, data.x_val, data.y_val, batch_size=bs)}
        runtime = winner.get("runtime", "torch")
        same = beside.get(f"teacher@{runtime}", teacher) if runtime != "torch" else teacher

        def speedups(ref: dict[str, Any]) -> dict[str, float]:
            return {"batch_1": ref["latency_ms_b1"] / winner["latency_ms_b1"], f"batch_{b}": ref["latency_ms_serving"] / winner["latency_ms_serving"]}

        steps = [("teacher (fp32, torch)", teacher)]
        bases = [r for r in result["students"] if r.get("search_base")]
        steps += [(f"student {r['key']} (fp32, torch)", r) for r in bases if "latency_ms_serving" in r]
        pruned = next((r for k, r in beside.items() if k.endswith(f"prune{winner.get('prune_ratio', 0):.2f}-none")), None)
        if pruned is not None:
            steps.append((f"+ pruning {winner['prune_ratio']:.2f} (fp32, torch)", pruned))
        steps.append((f"+ {winner.get('quantization')} in {runtime} (winner)", winner))
        breakdown = [{"step": label, "model": r["key"], "latency_ms": r["latency_ms_serving"],
                      "speedup_vs_teacher": teacher["latency_ms_serving"] / r["latency_ms_serving"]} for label, r in steps]
        trials = result["trials"]
        for t in trials:
            if t.get("status") == "ok":
                t["stopped_early"] = t.get("finetune_epochs", 0) < (s.finetune_epochs if t.get("prune_ratio", 0) > 0 else 0)
        extra = {
            "dataset": data.name, "metric": metric.describe() | {"teacher_reference": self._reference_value(teacher),
                                                               "budget": self.budget(cfg, teacher=teacher)},
            "teacher_reference_split": s.teacher_reference_split, "serving_batch_size": b,
            "constraint_met": result["meets_constraint"], "winner_test": winner_test,
            "speedup_vs_teacher": speedups(teacher),
            "speedup_vs_teacher_same_runtime": {"runtime": runtime, **speedups(same)},
            "gain_breakdown": breakdown,
            "search": {"algorithm": s.algorithm, "scheduler": s.scheduler, "num_trials": len(trials),
                       "trial_seconds": sum(t.get("trial_seconds") or 0.0 for t in trials),
                       "left_out": [{"quantization": q, "runtime": r, "why": why} for q, r, why in s.space.dropped],
                       "most_failed": most_failed(trials)},
        }
        md = [f"Winner on the test split: {winner_test['accuracy']:.2f}% accuracy (teacher {teacher['test_accuracy']:.2f}%), "
              f"{extra['speedup_vs_teacher'][f'batch_{b}']:.2f}x the teacher at batch {b}, "
              f"{extra['speedup_vs_teacher_same_runtime'][f'batch_{b}']:.2f}x the teacher in {runtime}.", "",
              *gain_breakdown_md(breakdown, batch_size=b), *pruning_md(trials, batch_size=b)]
        failed = [t for t in trials if t.get("status") != "ok"]
        if failed:
            md += ["## Failed trials", "", *[f"- {t['key']}: {t.get('explanation') or t.get('error', 'unknown error')}" for t in failed], ""]
        if extra["search"]["most_failed"]:
            md += [f"**{extra['search']['most_failed']}**", ""]
        if result.get("distill_sweep"):
            from slimray.families.classifier.report import distill_sweep_md

            md += distill_sweep_md(result["distill_sweep"])
        return extra, md
