"""The classifier family's training data and job on the one Ray Train loop (``slimray.training.distill``), which knows
no family: ``TrainData`` holds object-store references to the normalised arrays (or a Ray Dataset stream) and prepares
them for the workers, checked on the driver; ``classifier_job`` builds a ``TrainJob`` whose ``task`` section carries
the classifier's options (``slimray.families.classifier.train.ClassifierTrainOptions``).

Teacher outputs (``teacher_outputs``):

- ``precomputed`` (default): the driver computes the teacher's logits once and shares them through Ray's
  object store; each worker reads its shard through a ``DistributedSampler``. This is faster: the teacher's
  forward pass is paid once instead of every epoch on every worker. Measured on MNIST (ccexam teacher,
  2 workers, batch 128, ``bench/distill_throughput.py``, on a 2-core machine under heavy outside load, so
  orders of magnitude only): with the teacher in the loop its forward took 39 s of a 71 s epoch (rank 0),
  vs 44 s per epoch with precomputed logits, i.e. 1.6x slower per epoch. The teacher also never has to fit
  on a worker.
- ``in_loop``: each worker rebuilds the teacher from its artifact (``spec.json`` + ``model.safetensors``, whose
  bytes travel through the object store as data: no pickled module, no shared disk needed), freezes it (eval,
  no grads) and runs it under ``torch.inference_mode`` on every batch, in float16 on GPU if
  ``teacher_half_precision``. Feature KD (``features.py``) needs this: a hidden layer of the teacher per
  example is too large to precompute.

With ``alpha == 0`` and no feature KD the same loop trains on labels only (teacher training for the digits
recipe, and the labels-only baseline beside every distilled student).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from slimray.families.classifier.artifacts import artifact_files, load_artifact
from slimray.families.classifier.features import build_projection
from slimray.families.classifier.spec import build_model, parse_spec
from slimray.families.classifier.train import ClassifierTrainOptions, example_input
from slimray.schema import ConfigError
from slimray.training.distill import TrainJob

OPTIONS = frozenset(ClassifierTrainOptions.model_fields)


def classifier_job(**fields: Any) -> TrainJob:
    """A ``TrainJob`` of the classifier family: the classifier's options (``alpha``, ``temperature``,
    ``teacher_outputs``, ``teacher_dir``, ``teacher_half_precision``, ``feature_kd``, ``input_spec``) go to its ``task``
    section, checked; the rest are the loop's fields."""
    opts = ClassifierTrainOptions.model_validate({k: v for k, v in fields.items() if k in OPTIONS})
    rest = {k: v for k, v in fields.items() if k not in OPTIONS}
    return TrainJob(family="classifier", task=opts.model_dump(mode="json"), **rest)


def options(job: TrainJob) -> ClassifierTrainOptions:
    return ClassifierTrainOptions.model_validate(job.task)


@dataclass(frozen=True)
class TrainData:
    """Object-store references to normalised arrays: train (x, y[, teacher logits]) and val (x, y); or, for
    data on disk, ``train_stream``: a Ray Dataset (raw x, y[, logits]) that workers read in shards."""

    x_train: ray.ObjectRef | None
    y_train: ray.ObjectRef | None
    x_val: ray.ObjectRef
    y_val: ray.ObjectRef
    teacher_logits: ray.ObjectRef | None = None
    train_stream: Any = None

    def for_workers(self, job: TrainJob, *, init_state: Any) -> tuple[dict[str, Any], Any]:
        """The classifier family's shared objects for the workers and its stream, checked on the driver (feature
        layers, a teacher in the loop). Any family's data object may define this (``run_training``)."""
        opts = options(job)
        if job.final_dir is not None and opts.input_spec is None:
            raise ConfigError(f"{job.label}: final_dir needs input_spec (the artifact records its input)")
        check_feature_layers(job)
        in_loop = opts.teacher_outputs == "in_loop" and (opts.alpha > 0 or opts.feature_kd is not None)
        if opts.teacher_dir is None and in_loop:
            raise ConfigError(f"{job.label}: teacher_outputs: in_loop needs teacher_dir (the teacher artifact)")
        if self.train_stream is not None and opts.input_spec is None:
            raise ConfigError(f"{job.label}: streamed training data needs input_spec (inputs are normalised in the workers)")
        shared = {
            "x_train": self.x_train, "y_train": self.y_train, "x_val": self.x_val, "y_val": self.y_val,
            "teacher_logits": self.teacher_logits if opts.alpha > 0 and not in_loop else None,
            "teacher_files": ray.put(_teacher_files(opts.teacher_dir)) if in_loop else None,
            "init_state": init_state,
            "code_files": _code_files(job),
        }
        return shared, self.train_stream


def _code_files(job: TrainJob) -> dict[str, bytes] | None:
    """A user module's carried code, as bytes for the workers (they import it from there, not from any folder)."""
    spec = parse_spec(job.spec)
    code = getattr(spec, "code", None)
    if not code:
        return None
    from slimray.families.classifier.carried import files_for

    teacher_dir = options(job).teacher_dir
    return files_for(code, search=tuple(d for d in (teacher_dir,) if d))




def _teacher_files(path: str) -> dict[str, bytes]:
    """The teacher artifact's files as bytes: each worker rebuilds the module from them (nodes need no shared disk)."""
    try:
        return artifact_files(path)
    except FileNotFoundError as err:
        raise ConfigError(f"teacher_outputs: in_loop needs a teacher artifact: {err}") from None




def check_feature_layers(job: TrainJob) -> None:
    """Resolve the feature-KD layers and their projection on the driver, so a bad layer name or an
    incompatible pair of shapes is a ConfigError before any worker starts."""
    opts = options(job)
    if opts.feature_kd is None:
        return
    if opts.teacher_outputs != "in_loop" or opts.teacher_dir is None:
        raise ConfigError("feature KD needs teacher_outputs: in_loop and a teacher artifact")
    spec = parse_spec(job.spec)
    teacher, _ = load_artifact(opts.teacher_dir)
    shape = opts.input_spec["shape"] if opts.input_spec else None
    build_projection(build_model(spec), teacher, opts.feature_kd, example_input(spec, shape))
