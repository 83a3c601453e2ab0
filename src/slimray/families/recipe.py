"""The family contract of the one shared pipeline (``slimray.pipelines.flow``): what a model family gives, as pure
functions, so that one stage sequence, one Tune trainable, one winner rule and one report renderer run it.

A family implements ``Recipe`` in its own folder and names it in its registry entry (``Family.recipe``). Every hook
is pure torch/numpy: no Ray, no serving, no stage code. The pipeline calls them in this order:

1. ``check(cfg)`` before Ray starts; ``prepare(cfg, run_dir)`` -> the family's data (arrays, tokenised text, ...), loaded once
   on the driver; training data on disk the family streams instead (``stream_source``) is opened by the pipeline through
   Ray Data (``with_stream``), and after the teacher the pipeline runs its outputs over it as a batch-inference job
   (``teacher_outputs``, ``load_bytes``) and hands back a sample (``with_sample``);
2. ``teacher(cfg, data)`` -> the teacher ``nn.Module`` (loaded from the user's weights, or ``None`` when it is
   trained first with ``teacher_job``); ``evaluate(cfg, model, data)`` -> its quality row;
3. ``plan_students(cfg, teacher, data=)`` -> the students to distil (a name and the spec the TrainTask builds);
4. ``train_job(cfg, plan, distilled=)`` and ``train_data(cfg, data, teacher)``: the Ray Train job's family section
   and the arrays its workers share (the shared loop runs the family's ``TrainTask``); each student is distilled and,
   beside it, trained on labels only with the same budget: the search starts from whichever validates better;
5. ``candidates(cfg)`` -> the compression candidates that apply (key -> settings), one Tune trial each; ``measure(cfg,
   candidate, student, data)`` builds one and measures it into a row (quality keys, ``size_bytes``, ``params``, speed).
   A family whose trial shares costly work between settings (a fine-tune per prune ratio, then every quantization x
   sequence length) implements ``measure_rows`` instead: several rows per trial, each with its ``variant`` and
   ``settings``;
   A stepwise family (``stepwise``) gives ``measure_steps``: a generator of one row per step (a fine-tune epoch), which
   ASHA reads when ``search_plan`` asks for it (with Tune's random search or Optuna over the family's axes);
6. ``quality`` (or ``quality_of(cfg)``, a metric the user chooses): which row key the constraint reads, its direction and
   the budget's field (``budget(cfg, teacher=)``, measured from ``reference(cfg, teacher)``); ``admissible``: any further
   hard constraint on a row, judged against the teacher measured the same way; ``speed_key``: the row key the winner
   rule ranks by (higher is faster);
7. ``time(models, data, settings=)`` times models side by side in this process: the finalists in rounds (and, when the
   trials do not time, ``time_in_trials = False``, every finished candidate once first); a candidate the family
   times in a process of its own (``time_apart``, e.g. an engine that patches its process) is built and timed in
   one; ``timed_beside`` names reference models timed with a finalist (the teacher in the finalist's runtime);
8. ``save(path, model, spec)`` / ``load`` the artifact (safetensors + JSON spec) the codec serves; ``export`` writes
   the winner (by default ``save`` of the finalist);
9. ``columns``: the report's columns; ``report_extras`` adds the family's own sections (targets, memory).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Quality:
    """The family's quality constraint: ``key`` of a row (e.g. ``r2``, ``accuracy``, ``perplexity``), whether higher is
    better, and how the budget reads: ``drop`` (the teacher's value minus at most ``budget``, in the metric's units) or
    ``ratio`` (at most ``budget`` times the teacher's value, for lower-is-better metrics such as perplexity)."""

    key: str
    label: str
    higher_is_better: bool = True
    budget: str = "drop"  # "drop" | "ratio"

    def floor(self, teacher_value: float, budget: float) -> float:
        """The worst value a feasible row may have."""
        if self.budget == "ratio":
            return teacher_value * budget if not self.higher_is_better else teacher_value / budget
        return teacher_value - budget if self.higher_is_better else teacher_value + budget

    def feasible(self, value: float, *, teacher_value: float, budget: float) -> bool:
        return self.meets(value, self.floor(teacher_value, budget))

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def meets(self, value: float, floor: float) -> bool:
        """Whether ``value`` is no worse than ``floor`` (the worst value a feasible row may have)."""
        return value >= floor - 1e-9 if self.higher_is_better else value <= floor + 1e-9


@dataclass(frozen=True)
class Column:
    """One report column: the row key, its header and a format (``"{:.4f}"``; ``mb`` and ``x`` are special)."""

    key: str
    header: str
    fmt: str = "{:.4g}"

    def render(self, row: dict[str, Any]) -> str:
        v = row.get(self.key)
        if v is None:
            return "-"
        if self.fmt == "mb":
            return f"{v / 1e6:.3f}"
        if self.fmt == "x":
            return f"{v:.2f}x"
        if isinstance(v, str):
            return v
        return self.fmt.format(v)


@dataclass(frozen=True)
class SearchPlan:
    """How a family's candidates are drawn when not every one runs (``Recipe.search_plan``): ``axes`` (name -> the
    values Tune samples), ``key_of`` (a module-level function naming the candidate a draw is, one of
    ``Recipe.candidates``' keys), the algorithm (``grid``, ``random`` or ``optuna``), the trials drawn, the metrics a
    searcher reads (``metric``/``mode``, one objective or several) and, for early stopping, ``asha``: the keyword
    arguments of Tune's ASHA scheduler (``time_attr``, ``metric``, ``mode``, ``max_t``, ``grace_period``,
    ``reduction_factor``) over the steps a stepwise trial (``Recipe.measure_steps``) reports."""

    axes: dict[str, list[Any]]
    key_of: Any
    algorithm: str = "grid"
    num_samples: int | None = None
    metric: str | list[str] = "reported"
    mode: str | list[str] = "max"
    num_startup_trials: int | None = None
    asha: dict[str, Any] | None = None


@dataclass(frozen=True)
class StudentPlan:
    """A student to distil: its name (the run folder's ``students/<name>``) and the spec its TrainTask builds."""

    name: str
    spec: dict[str, Any]
    note: str = ""


class Recipe(abc.ABC):
    """One family's hooks for the shared pipeline (see the module docstring for the order). Subclasses set the class
    attributes and implement the abstract methods; ``cfg`` is the family's run config."""

    quality: Quality
    speed_key: str = "examples_per_s"  # the row key the winner rule ranks by (higher is faster)
    speed_label: str = "examples/s"
    columns: tuple[Column, ...] = ()
    trial_cpus: float = 1.0
    time_in_trials: bool = True  # False: the trials leave speed out, the driver times every candidate one at a time
    fresh_trial_process: bool = False  # True: every trial in a new process (an engine that patches its process)
    identity: str | None = None  # the candidate (settings key) that leaves a model as it is, if the family has one
    keep_teacher: bool = False  # True: a teacher the family loads (the user's) is saved as RUN/teacher too (trials load it)
    stepwise: bool = False  # True: a trial is ``measure_steps``, a row per step (e.g. per fine-tune epoch: ASHA's budget)
    timing_lock: bool = False  # True: trials time under one lock (``measure_steps``' ``timing``), never two at once

    def quality_of(self, cfg: Any) -> Quality:
        """The quality constraint of this run (by default the family's ``quality``; a family whose metric the user
        chooses reads it from the config)."""
        return self.quality

    def is_saved(self, path: Path) -> bool:
        """Whether ``path`` holds a finished artifact of this family (a rerun reuses it)."""
        from slimray.storage import SPEC

        return (path / SPEC).exists()

    # data and teacher
    def check(self, cfg: Any) -> None:
        """What can be checked before the run folder and Ray exist (files, columns, the user's code)."""

    @abc.abstractmethod
    def prepare(self, cfg: Any, run_dir: Path) -> Any:
        """The family's data, loaded once on the driver (checked: a bad file fails here, naming it)."""

    def stream_source(self, cfg: Any, data: Any) -> Any:
        """Training data the pipeline reads through Ray Data instead (``None``: none): a files section
        (``slimray.data.files``: image folders, Parquet, NPZ) or a built-in dataset to read the same way. The pipeline
        opens it (one checking pass over the training split; val and test read into memory), hands the opened source
        to ``with_stream``, lets the Train workers read the training split in shards and runs the teacher's outputs over
        it as a batch-inference job (``teacher_outputs``); a sample of them comes back through ``with_sample``."""
        return None

    def with_stream(self, cfg: Any, data: Any, opened: Any, *, run_dir: Path) -> Any:
        """``data`` completed from the opened stream (its ``input``, ``num_classes``, ``num_train``, ``val``, ``test``)."""
        raise NotImplementedError

    def teacher_outputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """One batch of the streamed training split with the teacher's outputs added (the batch-inference job's map)."""
        raise NotImplementedError

    def artifact_files(self, path: Path) -> dict[str, bytes]:
        """An artifact's files as bytes, to travel through the object store (nodes need no shared disk)."""
        raise NotImplementedError

    def load_bytes(self, files: dict[str, bytes]) -> nn.Module:
        """A model from ``artifact_files``' answer (the batch-inference actors rebuild the teacher so)."""
        raise NotImplementedError

    def sample_size(self, cfg: Any, data: Any) -> int:
        """How many rows of the teacher's outputs the driver reads back for the search (pruning, calibration, fine-tuning)."""
        return 10_000

    def with_sample(self, cfg: Any, data: Any, sample: dict[str, Any]) -> Any:
        """``data`` with a sample of the streamed training split and the teacher's outputs on it."""
        raise NotImplementedError

    def teacher(self, cfg: Any, data: Any) -> nn.Module | None:
        """The user's teacher, loaded; ``None`` when the teacher is trained first (``teacher_job``)."""
        return None

    def teacher_job(self, cfg: Any) -> tuple[StudentPlan, dict[str, Any]] | None:
        """(plan, job fields) that train the teacher on labels on Ray Train, when ``teacher`` gives none."""
        return None

    @abc.abstractmethod
    def evaluate(self, cfg: Any, model: nn.Module, data: Any) -> dict[str, Any]:
        """Quality of a float model on the held-out split (the row's quality keys, ``params``)."""

    # students
    @abc.abstractmethod
    def plan_students(self, cfg: Any, teacher: nn.Module, *, data: Any) -> list[StudentPlan]:
        """The students to distil from ``teacher`` (``data``: e.g. the examples a student derived by pruning ranks on)."""

    @abc.abstractmethod
    def train_job(self, cfg: Any, plan: StudentPlan, *, distilled: bool) -> dict[str, Any]:
        """The Ray Train job's fields for ``plan`` (``epochs``, ``lr``, ``task``: the family's own options, such as its KD
        weight, that its TrainTask reads): with ``distilled`` False, the same budget on labels only."""

    def references(self, cfg: Any, teacher: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """Untrained models reported beside the students (name -> (model, what it is)), e.g. a truncated teacher."""
        return {}

    def init_state(self, cfg: Any, plan: StudentPlan, teacher: nn.Module) -> dict[str, Any] | None:
        """The weights ``plan``'s student starts from on every Train worker (``None``: its TrainTask's own init)."""
        return None

    def job_spec(self, plan: StudentPlan, data: Any) -> dict[str, Any]:
        """The spec the TrainTask builds for ``plan`` once the data is known (e.g. the input width)."""
        return plan.spec

    @abc.abstractmethod
    def train_data(self, cfg: Any, data: Any, teacher: nn.Module | None) -> dict[str, Any]:
        """The arrays every Train worker shares (teacher outputs included when ``teacher`` is given)."""

    # compression search
    @abc.abstractmethod
    def candidates(self, cfg: Any) -> dict[str, dict[str, Any]]:
        """The compression candidates that apply: key -> settings (JSON values)."""

    def measure(self, cfg: Any, candidate: dict[str, Any], student: nn.Module, data: Any) -> tuple[nn.Module, dict[str, Any]]:
        """Build ``candidate`` from ``student`` and measure it: (the compressed model, its row)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither measure nor measure_rows")

    def search_plan(self, cfg: Any) -> SearchPlan | None:
        """How the candidates are drawn (``None``: every one, once, as a grid)."""
        return None

    def measure_steps(self, cfg: Any, candidate: dict[str, Any], student: Any, data: Any, *, out_dir: Path,
                      timing: Any, floor: float) -> Any:
        """A stepwise family's trial (``stepwise``): a generator of rows, one per step (each saved and reported to
        Tune, so a scheduler may stop the trial after any: its last row is its result). ``timing(name)``: a context
        manager holding the trials' timing lock; ``floor``: the quality floor (an early-stopping objective reads it).
        A failure is a row too (``status`` error, ``error``, ``advice``)."""
        raise NotImplementedError

    def measure_rows(self, cfg: Any, candidate: dict[str, Any], student: nn.Module, data: Any, *,
                     out_dir: Path) -> list[dict[str, Any]]:
        """The rows of one trial: by default the one ``measure`` gives. A family overriding this returns rows with a
        ``variant`` (the key's suffix) and ``settings`` (merged into the candidate, e.g. the artifact ``out_dir`` holds)."""
        return [self.measure(cfg, candidate, student, data)[1]]

    def build(self, candidate: dict[str, Any], student: nn.Module, data: Any) -> nn.Module:
        """The compressed model alone (the finalists are rebuilt in the driver to be timed side by side)."""
        return self.measure(None, candidate, student, data)[0]

    def budget(self, cfg: Any, *, teacher: dict[str, Any]) -> float:
        """The quality budget the constraint allows (``quality.floor``); ``teacher``: the teacher's row (a budget relative
        to the teacher's value reads it)."""
        return float(cfg.search.max_quality_drop)

    def reference(self, cfg: Any, teacher: dict[str, Any]) -> float:
        """The teacher's value the floor is measured from (by default its row's quality key)."""
        return float(teacher[self.quality_of(cfg).key])

    def admissible(self, cfg: Any, row: dict[str, Any], *, teacher: dict[str, Any]) -> bool:
        """A hard constraint beyond ``quality`` (e.g. a minimum cosine to the teacher, a prefill floor); rows failing it
        never win. ``teacher``: the teacher's row measured as ``row`` was (its identity trial beside the trials, the
        side-by-side figures beside the finalists)."""
        return True

    def admissible_rule(self, cfg: Any) -> str | None:
        """``admissible`` in words, for the console and the report (``None``: no further constraint)."""
        return None

    def trial_input(self, name: str, model: nn.Module, *, folder: Path | None, data: Any) -> Any:
        """What a trial receives for the starting model ``name``: by default the model itself (through the object
        store); a family with large models may hand over its folder (``folder``; ``None`` for the user's teacher)
        and load it in the trial. ``build`` and ``measure_rows`` accept either."""
        return model

    def time_apart(self, cfg: Any, settings: dict[str, Any]) -> bool:
        """Whether a candidate is built and timed in a process of its own (the pipeline runs it in an actor)."""
        return False

    def timed_beside(self, cfg: Any, row: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Reference models timed side by side with finalist ``row``: key -> (starting model, candidate settings),
        e.g. the dense teacher in the finalist's quantization and runtime (what the compression adds beyond it)."""
        return {}

    def notes(self, cfg: Any) -> list[str]:
        """Lines for the report about the search (e.g. a setting left out on this machine, and why)."""
        return []

    def advice(self, error: str, candidate: dict[str, Any]) -> str:
        """What to change when a candidate fails (one line for the console and the report)."""
        return "leave " + ", ".join(f"{k} {v}" for k, v in candidate.items()) + " out of the search"

    @abc.abstractmethod
    def time(self, models: dict[str, nn.Module], data: Any, *, cfg: Any,
             settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """One round of side-by-side timing in this process: name -> speed (``speed_key``'s units), or name -> a dict
        holding ``speed_key`` and further figures for the row (e.g. the speed at batch 1). ``settings``: each model's
        candidate settings (the teacher's are empty)."""

    # artifacts
    @abc.abstractmethod
    def save(self, path: Path, model: nn.Module, *, candidate: dict[str, Any], cfg: Any, data: Any) -> None:
        """Write the artifact (atomically; safetensors + JSON spec) that ``load`` and the family's codec read."""

    @abc.abstractmethod
    def load(self, path: Path) -> nn.Module:
        """The served model from its artifact alone."""

    def export(self, path: Path, model: Any, *, candidate: dict[str, Any], base: nn.Module, cfg: Any, data: Any) -> None:
        """Write the winner's artifact: ``model`` as timed (by default ``save``), or rebuilt from ``base``, the
        starting model it was compressed from."""
        self.save(path, model, candidate=candidate, cfg=cfg, data=data)

    def report_extras(self, cfg: Any, result: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The family's own report sections: (keys added to report.json, markdown lines). ``result``: ``run_dir``,
        ``teacher``, ``winner``, ``finalists``, ``beside`` (key -> timed row), ``students``, ``meets_constraint``,
        ``trials``, ``pareto_front`` (keys), ``seconds``, ``data``, ``distill_sweep`` (the family's distillation sweep's summary, or None)."""
        return {}, []

    def sample_request(self, data: Any) -> dict[str, Any]:
        """A request body of held-out examples for the family's native route (the serve check sends it)."""
        raise NotImplementedError
