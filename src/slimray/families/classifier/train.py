"""The classifier family's Ray Train task (pure torch): what each worker of a distillation trains and how.

Batches come from the shared arrays through a ``DistributedSampler`` (wrapped to count how often each example
was drawn, across workers), or, for data on disk, from this worker's Ray Data shard (``StreamLoader``: raw
inputs normalised here with the artifact's input spec, shuffled within a buffer by (seed, epoch)). The loss is
logit KD from precomputed teacher logits or from the teacher run in the loop (``TeacherInLoop``, rebuilt from
the teacher artifact's bytes, in float16 on GPU if asked), optionally plus feature KD through a learned
projection (``KDStudent``); with ``alpha == 0`` it trains on labels alone. Validation is held-out accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from slimray.families.base import TrainTask
from slimray.families.classifier.features import FeatureKDSpec, KDStudent, TeacherInLoop, build_projection
from slimray.families.classifier.kd import batch_loss
from slimray.families.classifier.spec import CNNSpec, InputSpec, build_model, parse_spec
from slimray.schema import StrictModel


class CountingSampler(torch.utils.data.Sampler[int]):
    """Passes a sampler's indices through and counts how often each index was drawn this epoch."""

    def __init__(self, inner: torch.utils.data.DistributedSampler, num_samples: int):
        self.inner = inner
        self.counts = torch.zeros(num_samples, dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)
        self.counts.zero_()

    def __iter__(self):
        for i in self.inner:
            self.counts[i] += 1
            yield i

    def __len__(self) -> int:
        return len(self.inner)


class StreamLoader:
    """One epoch of a Ray Data shard as (x, y[, teacher logits]) batches, shuffled within a buffer by (seed,
    epoch); raw inputs are normalised here with the artifact's input spec."""

    def __init__(self, shard: Any, *, batch_size: int, seed: int, input_spec: InputSpec, with_logits: bool):
        self.shard, self.batch_size, self.seed, self.input, self.with_logits = shard, batch_size, seed, input_spec, with_logits
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for b in self.shard.iter_torch_batches(
            batch_size=self.batch_size, local_shuffle_buffer_size=max(4 * self.batch_size, 2048),
            local_shuffle_seed=self.seed * 100_003 + self.epoch, drop_last=False,
        ):
            out = [self.input.normalize(b["x"]), b["y"].long()]
            if self.with_logits:
                out.append(b["logits"].float())
            yield out


def example_input(spec: Any, input_shape: list[int] | None = None) -> torch.Tensor:
    """A zero batch of two examples shaped like the model's input (for shape probes)."""
    if input_shape is not None:
        return torch.zeros(2, *input_shape)
    if isinstance(spec, CNNSpec):
        return torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
    return torch.zeros(2, spec.in_features)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ClassifierTrainOptions(StrictModel):
    """The classifier's section of a Train job (``TrainJob.task``): the KD loss's weights, where the teacher's outputs
    come from, feature KD and the artifact's input spec."""

    alpha: float = 0.0  # weight of the KD term; 0 (and no feature KD): labels only
    temperature: float = 4.0
    teacher_outputs: Literal["precomputed", "in_loop"] = "precomputed"
    teacher_dir: str | None = None  # the teacher artifact, for a teacher in the loop
    teacher_half_precision: bool = True  # a teacher in the loop runs in float16 on GPU
    feature_kd: FeatureKDSpec | None = None
    input_spec: dict[str, Any] | None = None  # the artifact's input spec (needed to write one, and for streamed data)


class ClassifierTask(TrainTask):
    """Logit (and feature) KD, or labels alone, for any classifier spec. Data: ``x_train``/``y_train`` (and
    ``teacher_logits``) arrays or a shard; ``x_val``/``y_val``; ``teacher_files`` for a teacher in the loop."""

    headline = "val_accuracy"

    def __init__(self, config: dict[str, Any], data: dict[str, Any], **kwargs: Any):
        super().__init__(config, data, **kwargs)
        if data.get("code_files"):  # a user module's carried code: this worker imports it from these bytes
            from slimray.families.classifier.carried import remember

            remember(data["code_files"])
        self.spec = parse_spec(config["spec"])
        self.opts = ClassifierTrainOptions.model_validate(config["task"])
        self.input_shape = self.opts.input_spec["shape"] if self.opts.input_spec else None
        self.feature = self.opts.feature_kd
        self.teacher: TeacherInLoop | None = None
        self.use_cuda = self.device.type == "cuda"
        self.x_val = torch.from_numpy(data["x_val"])
        self.y_val = torch.from_numpy(data["y_val"])

    # the model
    def build(self) -> nn.Module:
        student = build_model(self.spec)
        projection = None
        if self.data.get("teacher_files") is not None:
            from slimray.families.classifier.artifacts import load_artifact_bytes

            teacher_model = load_artifact_bytes(self.data["teacher_files"])[0]
            if self.feature:
                projection = build_projection(student, teacher_model, self.feature, example_input(self.spec, self.input_shape))
            half = self.use_cuda and self.opts.teacher_half_precision
            self.teacher = TeacherInLoop(
                teacher_model.to(self.device), feature_layer=self.feature.teacher_layer if self.feature else None,
                dtype=torch.float16 if half else torch.float32,
            )
        self._make_loader()
        return KDStudent(student, projection, self.feature.student_layer) if self.feature else student

    def student(self, net: nn.Module) -> nn.Module:
        return net.student if isinstance(net, KDStudent) else net

    def split_state(self, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        if self.feature is None:
            return {"model": state}
        part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        return {"model": part("student."), "projection": part("projection.")}

    def load_parts(self, net: nn.Module, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        self.student(net).load_state_dict(parts["model"])
        if self.feature is not None:
            net.projection.load_state_dict(parts["projection"])

    @classmethod
    def rebuild(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        model = build_model(parse_spec(config["spec"]))
        model.load_state_dict(state)
        return model.eval()

    # data
    def _make_loader(self) -> None:
        cfg = self.config
        self.use_logits = self.teacher is None and self.opts.alpha > 0
        if self.shard is not None:  # Ray Data: this worker's shard of the training files (raw units)
            self.loader = StreamLoader(self.shard, batch_size=cfg["batch_size"], seed=cfg["seed"],
                                       input_spec=InputSpec.model_validate(self.opts.input_spec), with_logits=self.use_logits)
            self.sampler = self.loader
            return
        tensors = [torch.from_numpy(self.data["x_train"]), torch.from_numpy(self.data["y_train"])]
        if self.use_logits and self.data.get("teacher_logits") is not None:
            tensors.append(torch.from_numpy(self.data["teacher_logits"]))
        dataset = torch.utils.data.TensorDataset(*tensors)
        self.sampler = CountingSampler(
            torch.utils.data.DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg["seed"]),
            len(dataset),
        )
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], sampler=self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self, epoch: int) -> Iterator[Any]:
        return iter(self.loader)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        return batch_loss(
            model, batch, temperature=self.opts.temperature, alpha=self.opts.alpha, teacher=self.teacher,
            feature_weight=self.feature.weight if self.feature else 0.0,
            device=self.device if self.use_cuda else None, autocast_dtype=torch.bfloat16 if self.use_cuda else None,
        )

    def epoch_counts(self, num_examples: int) -> dict[str, int]:
        """How often each training sample was drawn this epoch, over all workers (a streamed shard: the total)."""
        if isinstance(self.sampler, StreamLoader):
            seen = torch.tensor([num_examples])
            if _distributed() and self.world > 1:
                torch.distributed.all_reduce(seen)
            return {"samples_seen": int(seen.item())}
        counts = self.sampler.counts.clone()
        if _distributed() and self.world > 1:
            torch.distributed.all_reduce(counts)
        return {"samples_seen": int(counts.sum()), "distinct_samples": int((counts > 0).sum()), "max_seen_per_sample": int(counts.max())}

    def steps_per_epoch(self) -> int:
        return 0 if isinstance(self.sampler, StreamLoader) else len(self.loader)

    # validation and the artifact
    def validate(self, student: nn.Module) -> dict[str, float]:
        student = student.to(self.device).eval()
        with torch.inference_mode():
            pred = torch.cat([student(self.x_val[i : i + 2048].to(self.device)).argmax(1).cpu() for i in range(0, len(self.x_val), 2048)])
        return {"val_accuracy": 100.0 * (pred == self.y_val).float().mean().item()}

    def save_artifact(self, path: str, student: nn.Module, metrics: dict[str, Any]) -> None:
        from pathlib import Path

        from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact

        save_artifact(path, student.cpu(), ArtifactSpec(
            name=Path(path).name, model=self.spec, input=InputSpec.model_validate(self.opts.input_spec),
            metadata={"val_accuracy": metrics["val_accuracy"], "epochs": self.config["epochs"]},
        ))
