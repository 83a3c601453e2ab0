"""What a model family gives the shared Ray Train loop: a ``TrainTask``, pure torch (no ray).

The loop (``slimray.training.distill``) owns everything distributed and everything about state: process group
and device, DDP or FSDP2, the optimizer's state, the learning rate at each step, checkpoints every epoch and
resume from them (also after a worker fails), metrics, the console line, the final artifact. A family's task
owns what is model-specific: the module that trains, its batches, its loss, its validation and how its
artifact is written. One task object lives on each worker, built from the job's JSON config and the data the
driver shared (numpy arrays fetched from Ray's object store, or a Ray Data shard to iterate).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class TrainTask(abc.ABC):
    """One family's training on one worker. ``config`` is the job (``TrainJob.model_dump()``: ``spec``, ``lr``,
    ``epochs``, ``batch_size``, ``seed``, ... and the family's own ``task`` section); ``data`` the shared objects;
    ``shard`` this worker's Ray Data shard (streamed training data) or None."""

    #: the metric ``validate`` returns that the console line shows first (``val_<name>``)
    headline: str = "loss"

    def __init__(self, config: dict[str, Any], data: dict[str, Any], *, shard: Any = None, rank: int = 0, world: int = 1,
                 device: torch.device | None = None):
        self.config, self.data, self.shard = config, data, shard
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")

    # the model
    @abc.abstractmethod
    def build(self) -> nn.Module:
        """The module that trains: the student, or a wrapper holding it (e.g. with a feature projection)."""

    def student(self, net: nn.Module) -> nn.Module:
        """The part of ``net`` that becomes the artifact (``init_state`` loads into it)."""
        return net

    def split_state(self, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """``net``'s full state dict as checkpoint parts, one safetensors file each; ``model`` is the student."""
        return {"model": state}

    def load_parts(self, net: nn.Module, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        self.student(net).load_state_dict(parts["model"])

    @classmethod
    @abc.abstractmethod
    def rebuild(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        """The trained student from its weights, on the driver or rank 0 (eval mode, CPU)."""

    # optimisation
    def parameters(self, net: nn.Module) -> Iterable[nn.Parameter]:
        return net.parameters()

    def optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.config["lr"], weight_decay=self.config.get("weight_decay", 0.0))

    def lr_factor(self, *, epoch: int, step: int) -> float:
        """The learning rate at (epoch, step) over the base rate: a function of the position alone, so a
        resumed run repeats the uninterrupted one. Default: constant, or a cosine over epochs."""
        import math

        if self.config.get("lr_schedule") == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.config["epochs"]))
        return 1.0

    # data and loss
    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's ``batches`` (reshuffle, reset counters)."""

    @abc.abstractmethod
    def batches(self, epoch: int) -> Iterator[Any]:
        """This worker's batches of ``epoch`` (equal numbers on every worker, so collectives line up)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(loss, number of examples, named parts to average over the epoch); ``model`` is the wrapped module."""

    def steps_per_epoch(self) -> int:
        """Batches per epoch on this worker (0 when not known in advance, e.g. a streamed shard)."""
        return 0

    def epoch_counts(self, num_examples: int) -> dict[str, int]:
        """How the epoch drew the training data (a collective when distributed: every rank calls it)."""
        return {"samples_seen": num_examples * self.world}

    # validation and artifacts (rank 0)
    @abc.abstractmethod
    def validate(self, student: nn.Module) -> dict[str, float]:
        """Held-out metrics of the student after an epoch, keys ``val_*``."""

    def save_artifact(self, path: str, student: nn.Module, metrics: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not write a final artifact (final_dir)")


def describe_val(metrics: dict[str, Any]) -> str:
    """The validation part of a console line: ``val acc 98.20%`` or ``val cosine 0.9412``."""
    parts = []
    for k, v in metrics.items():
        if not k.startswith("val_") or not isinstance(v, (int, float)):
            continue
        if k == "val_accuracy":
            parts.append(f"val acc {v:.2f}%")
        else:
            parts.append(f"val {k[4:].replace('_', ' ')} {v:.4f}")
    return "  ".join(parts)


@dataclass
class EpochStats:
    loss: float
    num_samples: int
    seconds: float
    breakdown: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.num_samples / max(self.seconds, 1e-9)


LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int, dict[str, float]]"]


def run_epoch(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, optimizer: torch.optim.Optimizer, *,
              lr_at: Callable[[int], float] | None = None, profile: bool = False,
              on_step: Callable[[int, float, int], None] | None = None) -> EpochStats:
    """One pass: for each batch, ``lr_at(step)`` (if given) sets the lr, ``loss_fn(model, batch)`` gives (loss,
    examples, named parts), then backward and step. With ``profile`` the wall time is split into ``data_s``
    (waiting for the batch), ``teacher_s`` (a part the loss reports for a teacher run in the loop),
    ``forward_s`` (student forward + loss), ``backward_s`` (with DDP this includes the gradient all-reduce it
    does not overlap) and ``step_s`` (optimizer). ``on_step(step, mean loss so far, examples)`` after each step."""
    model.train()
    total, n, sums = 0.0, 0, {}
    times = dict.fromkeys(("data_s", "teacher_s", "forward_s", "backward_s", "step_s"), 0.0)
    clock = time.perf_counter
    start = mark = clock()
    for step, batch in enumerate(batches):
        if profile:
            now = clock()
            times["data_s"] += now - mark
            mark = now
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        loss, num, parts = loss_fn(model, batch)
        if profile:
            now = clock()
            teacher_s = parts.get("teacher_s", 0.0)
            times["teacher_s"] += teacher_s
            times["forward_s"] += now - mark - teacher_s
            mark = now
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if profile:
            now = clock()
            times["backward_s"] += now - mark
            mark = now
        optimizer.step()
        total += loss.item() * num
        n += num
        for k, v in parts.items():
            if k != "teacher_s":
                sums[k] = sums.get(k, 0.0) + v * num
        if profile:
            now = clock()
            times["step_s"] += now - mark
            mark = now
        if on_step is not None:
            on_step(step, total / max(n, 1), n)
    return EpochStats(loss=total / max(n, 1), num_samples=n, seconds=clock() - start, breakdown=times if profile else {},
                      parts={f"loss_{k}": v / max(n, 1) for k, v in sums.items()})
